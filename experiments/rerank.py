"""Where does a BLIP teacher's ITM re-ranking lose to its own ITC? No training.

    .venv/bin/python -m experiments.rerank BLIP_DIR [SHARD_DIR]

On the split (default: test): R@1 of ITM over the ITC top-16, of BLIP's own mix (ITM logit + w x ITC cosine, as
BLIP's retrieval evaluation adds them) for several w, and of ITC alone; the ITC R@16 that caps re-ranking; and,
for text-to-image, what each top-1 image has in common with the true one, read from the scenes in the shards' json:
"0/1 object(s) shared" (a (colour, shape) object of the truth), "binding" (same colours and shapes, bound
differently: a contrast twin), "relation differs", "size differs", or "fits caption" (also a true image).
"""
import collections
import sys
from pathlib import Path

import torch

from bench.common import caption_meaning, shard_metas
from mcad_cache.teachers.single import SingleTeacherSpec, load_single
from mcad_core.evaluation import flat_captions
from mcad_core.retrieval import i2t_ranks, recall_from_ranks, t2i_ranks
from mcad_core.shards import list_shards, load_split

K = 16
teacher = load_single(SingleTeacherSpec(sys.argv[1]))
shards = Path(sys.argv[2] if len(sys.argv) > 2 else "data/default/test")
split = load_split(list_shards(shards))
texts, image_of = flat_captions(split)
tokens = teacher.tokenize(texts)
with torch.no_grad():
    vision = torch.cat([teacher.vision_tokens(teacher.pixels_from_uint8(c)) for c in split.images.split(256)])
    image_emb = teacher.itc_images(vision)
    text_emb = torch.cat([teacher.itc_texts(tokens.select(rows)) for rows in torch.arange(len(texts)).split(256)])
    cosine = image_emb @ text_emb.t()

    def itm(images: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
        return torch.cat([teacher.itm(vision[i], tokens.select(t)).logits
                          for i, t in zip(images.split(512), captions.split(512))])

    top_texts = cosine.topk(K, 1).indices  # (N, K) per image
    itm_i2t = itm(torch.arange(len(image_emb)).repeat_interleave(K), top_texts.reshape(-1)).view(-1, K)
    top_images = cosine.t().topk(K, 1).indices  # (T, K) per caption
    itm_t2i = itm(top_images.reshape(-1), torch.arange(len(texts)).repeat_interleave(K)).view(-1, K)

image_ids = torch.arange(len(image_emb))


def r1(fine_i2t: torch.Tensor, fine_t2i: torch.Tensor) -> str:
    i2t = cosine.clone() - 1e6
    i2t.scatter_(1, top_texts, fine_i2t)
    t2i = cosine.t().clone() - 1e6
    t2i.scatter_(1, top_images, fine_t2i)
    a = recall_from_ranks(i2t_ranks(i2t, image_ids, image_of), [1])[1]
    b = recall_from_ranks(t2i_ranks(t2i, image_of), [1])[1]
    return f"{a:.1f} / {b:.1f}"


itc_i2t, itc_t2i = cosine.gather(1, top_texts), cosine.t().gather(1, top_images)
print(f"{len(split.keys)} images, {len(texts)} captions, re-ranking the ITC top-{K}\n")
print("| score | R@1 i2t / t2i |\n|---|---|")
print(f"| ITM | {r1(itm_i2t, itm_t2i)} |")
for w in (1, 5, 20):
    print(f"| ITM + {w} x ITC cosine | {r1(itm_i2t + w * itc_i2t, itm_t2i + w * itc_t2i)} |")
print(f"| ITC | {r1(itc_i2t, itc_t2i)} |")
i2t_16 = recall_from_ranks(i2t_ranks(cosine, image_ids, image_of), [K])[K]
t2i_16 = recall_from_ranks(t2i_ranks(cosine.t(), image_of), [K])[K]
print(f"\nITC R@{K} (the re-ranking ceiling): i2t {i2t_16:.1f}, t2i {t2i_16:.1f}\n")

scenes = {meta["key"]: meta["scene"] for meta in shard_metas(shards)}
scene_of = [scenes[key] for key in split.keys]


def kind(caption: str, truth: dict, got: dict) -> str:
    with_size = bool({"small", "large"} & set(caption.split()))
    if caption_meaning(truth, with_size) == caption_meaning(got, with_size):
        return "fits caption"
    objects = [sorted((o["colour"], o["shape"]) for o in s["objects"]) for s in (truth, got)]
    if objects[0] == objects[1]:
        same_without_size = caption_meaning(truth, False) == caption_meaning(got, False)
        return "size differs" if with_size and same_without_size else "relation differs"
    if all(sorted(o[f] for o in truth["objects"]) == sorted(o[f] for o in got["objects"]) for f in ("colour", "shape")):
        return "binding"
    return f"{len(set(objects[0]) & set(objects[1]))} object(s) shared"


print("| t2i top-1 | " + " | ".join(["correct", "fits caption", "binding", "relation differs", "size differs",
                                     "1 object(s) shared", "0 object(s) shared"]) + " |\n|---|" + "---:|" * 7)
for name, best in (("ITC", top_images[:, 0]), ("ITM", top_images.gather(1, itm_t2i.argmax(1, keepdim=True))[:, 0])):
    counts = collections.Counter(
        "correct" if g == i else kind(c, scene_of[i], scene_of[g])
        for c, i, g in zip(texts, image_of.tolist(), best.tolist())
    )
    cells = [counts[k] / len(texts) for k in ("correct", "fits caption", "binding", "relation differs", "size differs",
                                               "1 object(s) shared", "0 object(s) shared")]
    print(f"| {name} | " + " | ".join(f"{c:.1%}" for c in cells) + " |")
