"""The closed sets of names stage 2's settings take, in a module without torch.

The losses, the batch stream and the config check against these, and the CLI lists them as its choices, so
`mcad --help` shows them without importing torch and a new value is added in one place.
"""

FD_KINDS = ("cosine", "mse")
KD_KINDS = ("full", "negatives")
KD_DIRECTIONS = ("both", "i2t", "t2i")
BATCHINGS = ("neighbor", "random")
