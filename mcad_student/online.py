"""The online baseline: MCAD's targets computed by running the teachers on every batch.

This is the only stage-2 module that imports teacher code. It exists to measure
what the cache saves (speed) and what it costs (quality): the same batches, the
same losses, with the teacher outputs recomputed in the loop instead of read
from the store. Candidates are the in-batch top-k by the dual-stream ensemble
(the online method cannot search a whole block per step), rescored by the ITM
head and fused with the store's fusion rule; the integration module is the
one stage 1 trained (its weights are read from the store).
"""

from __future__ import annotations

import numpy as np
import torch

from mcad_cache.fusion import fuse
from mcad_cache.integrate import IntegrationModule
from mcad_cache.store import CacheMismatchError, CacheStore
from mcad_cache.teachers.dual import DualStreamTeacher, DualTeacherSpec
from mcad_cache.teachers.single import SingleStreamTeacher, load_single, parse_single
from mcad_cache.topk import fuse_embeddings
from mcad_core.views import render_views


class OnlineTeachers:
    """Teachers run in the loop, with the search weights, fusion rule and integration module of a cache.

    ``from_store`` loads the cache's own teachers (the specs its manifest names, weights checked by
    hash); the constructor takes any teachers, e.g. random-init hub shapes for the speed benchmark.
    """

    def __init__(self, dual_teachers: dict[str, DualStreamTeacher], single: SingleStreamTeacher,
                 weights: list[float], k: int, rule: str, a: float, integration: IntegrationModule,
                 dual_scale: float | None = None) -> None:
        self.duals = list(dual_teachers)
        self.dual_teachers = dual_teachers
        self.single = single
        self.weights = list(weights)
        self.scales = [t.logit_scale for t in dual_teachers.values()]
        self.k, self.rule, self.a = int(k), rule, float(a)
        # The scale the integration module was trained with: sqrt of it normalizes the fused embeddings.
        self.dual_scale = (float(sum(w * s for w, s in zip(self.weights, self.scales, strict=True)))
                           if dual_scale is None else float(dual_scale))
        self.integration = integration.eval()

    @classmethod
    def from_store(cls, store: CacheStore, device: str = "cpu") -> OnlineTeachers:
        manifest = store.manifest
        described = manifest["teachers"]
        duals = {
            name: DualStreamTeacher.load(DualTeacherSpec(described[name]["name"], described[name]["pretrained"]),
                                         device)
            for name in manifest["dual_teachers"]
        }
        single_name = manifest["single_teacher"]
        single = load_single(parse_single(described[single_name].get("spec", described[single_name]["name"])), device)
        loaded = {**{n: t.identity() for n, t in duals.items()}, single_name: single.identity()}
        differences = [n for n, identity in loaded.items() if identity.weights_sha256 != described[n]["weights_sha256"]]
        if differences:
            raise CacheMismatchError(store.path, [f"teachers {differences} no longer have the weights the cache "
                                                  "was made with"])
        info = dict(store.root.attrs["integration"])
        integration = IntegrationModule(info["dual_dim"], info["single_dim"], info["config"]["dim"])
        group = store.root["integration"]
        integration.load_state_dict(
            {key: torch.from_numpy(np.asarray(group[key][...])) for key in integration.state_dict()})
        return cls(duals, single, manifest["search"]["dual_weights"], manifest["search"]["k"],
                   manifest["fusion"]["rule"], manifest["fusion"]["a"], integration, info["dual_scale"])

    @torch.no_grad()
    def targets(self, source_images: torch.Tensor, boxes: torch.Tensor, captions: list[str]) -> dict:
        """Ensemble targets (i2t, t2i) with fused in-batch top-k entries, and integrated features."""
        images, texts = [], []
        for name in self.duals:
            teacher = self.dual_teachers[name]
            pixels = teacher.pixels_from_uint8(render_views(source_images, boxes, teacher.image_size))
            images.append(teacher.encode_images(pixels))
            texts.append(teacher.encode_texts(captions))
        factors = [w * s for w, s in zip(self.weights, self.scales, strict=True)]
        image_vecs, text_vecs = fuse_embeddings(images, factors), fuse_embeddings(texts, factors)
        dual = image_vecs @ text_vecs.t()
        batch = len(captions)
        k = min(self.k, batch)
        i2t_ids = dual.topk(k, dim=1).indices  # (B, k) text columns
        t2i_ids = dual.t().topk(k, dim=1).indices  # (B, k) image rows
        rows = torch.cat([torch.arange(batch).repeat_interleave(k), t2i_ids.reshape(-1), torch.arange(batch)])
        cols = torch.cat([i2t_ids.reshape(-1), torch.arange(batch).repeat_interleave(k), torch.arange(batch)])
        single = self.single
        tokens = single.vision_tokens(single.pixels_from_uint8(render_views(source_images, boxes, single.image_size)))
        text = single.tokenize(captions)
        out = single.itm(tokens[rows], text.select(cols))
        itm = torch.full_like(dual, float("nan"))
        itm[rows, cols] = out.logits.float()
        i2t = dual.clone()
        i2t_entries = (torch.arange(batch).unsqueeze(1), i2t_ids)
        i2t[i2t_entries] = fuse(self.rule, dual[i2t_entries], itm[i2t_entries], self.a)
        t2i = dual.t().clone()
        t2i_entries = (torch.arange(batch).unsqueeze(1), t2i_ids)
        t2i[t2i_entries] = fuse(self.rule, dual.t()[t2i_entries], itm.t()[t2i_entries], self.a)
        positive = out.fused[-batch:].float()
        norm = self.dual_scale**0.5
        int_image, int_text = self.integration(image_vecs / norm, positive, text_vecs / norm, positive)
        return {"ensemble": (i2t, t2i), "integrated_image": int_image, "integrated_text": int_text}
