"""What names a teacher in a cache manifest: where it came from and a hash of its weights."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class TeacherIdentity:
    kind: str  # "dual" or "single"
    name: str  # open_clip model name / "local-dir:PATH" / hub id / local directory
    pretrained: str | None
    weights_sha256: str

    def to_dict(self) -> dict:
        return asdict(self)


def state_dict_sha256(module: torch.nn.Module) -> str:
    """Hash of parameter and buffer values in name order: equal weights give equal hashes,
    whatever file format or path they were loaded from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
