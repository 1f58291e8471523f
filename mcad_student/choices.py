"""The closed sets of names stage 2's settings take, in a module without torch.

The losses, the batch stream and the config check against these, and the CLI lists them as its choices, so
`mcad --help` shows them without importing torch and a new value is added in one place.
"""

FD_KINDS = ("cosine", "mse")
KD_KINDS = ("full", "negatives")
KD_DIRECTIONS = ("both", "i2t", "t2i")
BATCHINGS = ("neighbor", "random")
# How AMMKD weighs its dual-stream teachers each step: "min_norm" (AMMKD's: the min-norm point of the per-teacher
# kd gradients, which favours the teacher closest to the student) or "confidence" (softmax of minus each
# teacher's cross-entropy on the batch's true pairs: the teacher that ranks the truth better weighs more).
AMMKD_WEIGHTINGS = ("min_norm", "confidence")
PRECISIONS = ("fp32", "amp-bf16", "amp-fp16")  # stage 2's arithmetic: float32, or autocast to bfloat16 / float16
