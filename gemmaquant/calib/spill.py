"""A tensor parked in a file while it is not needed, its memory freed, read back bit for bit.

`--algorithm gptq` collects every Linear input's XᵀX of a layer in one pass, then rounds the Linears
one input at a time. On Gemma 4 31B's full-attention layers that is 3.2 GB of XᵀX (the down_proj's
21504² alone 1.85 GB, the o_proj's 16384² 1.07 GB) while the rounding of any one Linear needs only its
own input's: the others wait in a file (`Parked`). A Linear's own XᵀX is not needed while its codes
are chosen, which reads only the factor of H⁻¹, the same size: `Held` lets it wait in the file then
too, and the factor is built from the file's rows (`ggml_gptq.hessian_factor`).

The file is unlinked as soon as it is created (an open descriptor keeps it), so nothing is left
behind, whatever ends the process. Put it on a disk, not a tmpfs: `optimize_gguf_tensors` uses the
output's directory.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from ..errors import GemmaQuantError

CHUNK = 1 << 26  # bytes per read or write call


class Parked:
    """`t` written to an unlinked file in `directory`; `load()` returns it (a new tensor), `close()` frees
    the file. The caller drops its own references to `t` for the memory to go."""

    def __init__(self, t: torch.Tensor, directory: Path | str):
        self.shape, self.dtype = tuple(t.shape), t.dtype
        self.nbytes = t.numel() * t.element_size()
        self.file = None
        try:
            fd, path = tempfile.mkstemp(prefix=".gemmaquant-parked-", dir=directory)
            os.unlink(path)
            self.file = os.fdopen(fd, "w+b", buffering=0)
            view = _bytes(t.contiguous())
            done = 0
            while done < self.nbytes:  # an unbuffered write may take fewer bytes than it was given
                done += self.file.write(view[done:done + CHUNK])
        except OSError as e:
            self.close()
            raise GemmaQuantError(f"{directory}: cannot park a {self.nbytes / 1e9:.2f} GB calibration matrix "
                                  f"there while other Linears are rounded ({e.strerror}); free that much disk "
                                  f"space beside the output") from None

    def load(self) -> torch.Tensor:
        if self.file is None:
            raise ValueError("this parked tensor was closed")
        out = torch.empty(self.shape, dtype=self.dtype)
        view = _bytes(out)
        self.file.seek(0)
        done = 0
        while done < self.nbytes:
            got = self.file.readinto(view[done:done + CHUNK])
            if not got:
                raise GemmaQuantError(f"a parked calibration matrix came back short ({done} of {self.nbytes} bytes)")
            done += got
        return out

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """[len(idx), cols] the rows idx (1-D int) of a 2-D tensor, read from the file."""
        if self.file is None:
            raise ValueError("this parked tensor was closed")
        cols = self.shape[1]
        out = torch.empty(len(idx), cols, dtype=self.dtype)
        view, row = _bytes(out), cols * out.element_size()
        fd = self.file.fileno()
        for k, i in enumerate(idx.tolist()):
            if os.preadv(fd, [view[k * row:(k + 1) * row]], i * row) != row:
                raise GemmaQuantError(f"a parked calibration matrix came back short (row {i})")
        return out

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


class Held:
    """One input's H = XᵀX [n, n], in memory or waiting in a file between its uses. `get()` gives it in
    memory (read back if parked); `park()` lets it wait in a file in `directory` (written once, at the
    first park) and drops this object's reference; `H[idx]` reads rows from wherever it is, and
    `diagonal()` is kept aside. Without a directory, `park()` does nothing: H stays in memory. The
    caller must not keep references to the tensor it hands over, or parking frees nothing."""

    def __init__(self, H: torch.Tensor, directory: Path | str | None = None):
        self.shape, self.directory = tuple(H.shape), directory
        self._t, self._file, self._diag = H, None, H.diagonal().clone()

    def get(self) -> torch.Tensor:
        if self._t is None:
            self._t = self._file.load()
        return self._t

    def park(self) -> None:
        if self.directory is None:
            return
        if self._file is None:
            self._file = Parked(self._t, self.directory)
        self._t = None

    def diagonal(self) -> torch.Tensor:
        return self._diag

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        return self._t[idx] if self._t is not None else self._file.rows(idx)

    def close(self) -> None:
        self._t = None
        if self._file is not None:
            self._file.close()
            self._file = None


def held(H: "torch.Tensor | Held") -> Held:
    """H as a `Held` (a tensor stays in memory: its caller holds it anyway)."""
    return H if isinstance(H, Held) else Held(H)


def _bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.view(-1).view(torch.uint8).numpy())
