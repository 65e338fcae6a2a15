"""Recipes: one flat TOML file per use, mapping one-to-one onto scheme and calibration settings.

    # what it is for, what it costs
    model = "google/gemma-2-9b-it"     # the model it was written for (informational)
    scheme = "fp8"                     # a name from the scheme registry
    algorithm = "rtn"                  # optional; must be allowed for the scheme
    calib_samples = 128                # optional calibration settings
    calib_len = 512
    alpha = 0.5                        # SmoothQuant migration strength
    imatrix = true                     # GGUF only: compute an importance matrix
    group_size = 64                    # compressed-tensors group schemes (w4a16): 32, 64 or 128
    ignore = ["re:.*mlp\\.down_proj$"]  # compressed-tensors: more Linears to leave unquantized

Shipped recipes live in the repository's recipes/ folder (and in the package, so they work after a
plain `pip install`). Validation names the file, the key and the allowed values.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import GemmaQuantError
from .formats.inputs import check_input_file, read_toml
from .limits import INT_OPTIONS
from .schemes import Scheme, get_scheme

# key -> (type(s), description)
KEYS = {
    "model": (str, "the model the recipe was written for (informational)"),
    "scheme": (str, "scheme name from `gemmaquant schemes`"),
    "algorithm": (str, "quantization algorithm allowed for the scheme"),
    "calib": (str, "calibration text file (default: the built-in text)"),
    "calib_samples": (int, "number of calibration samples"),
    "calib_len": (int, "tokens per calibration sample"),
    "alpha": (float, "SmoothQuant migration strength, 0..1"),
    "imatrix": (bool, "GGUF: compute an importance matrix from calibration text"),
    "group_size": (int, "compressed-tensors group schemes: weights per scale group (32, 64, 128)"),
    "ignore": (list, "compressed-tensors: Linears left unquantized besides the default ones (module names, "
                     "or re:REGEX matched from the start of the name, as in quantization_config.ignore)"),
    "description": (str, "one line shown by `gemmaquant recipes`"),
}
SCHEME_KEYS = ("group_size", "ignore")  # change the scheme itself (Recipe.scheme), not the run


@dataclass(frozen=True)
class Recipe:
    name: str
    path: Path
    scheme: Scheme
    settings: dict  # validated keys other than scheme/model/description
    model: str | None
    description: str


def recipe_dirs() -> list[Path]:
    here = Path(__file__).resolve().parent
    return [p for p in (here / "recipes", here.parent / "recipes") if p.is_dir()]


def shipped_recipes() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for d in recipe_dirs():
        for p in sorted(d.glob("*.toml")):
            found.setdefault(p.stem, p)
    return found


def find_recipe(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix == ".toml" or "/" in name_or_path:
        if not p.exists():
            raise GemmaQuantError(f"{p}: no such recipe file")
        return check_input_file(p, "--recipe")
    shipped = shipped_recipes()
    if name_or_path not in shipped:
        raise GemmaQuantError(f"unknown recipe {name_or_path!r} (shipped: {', '.join(shipped) or 'none'}; "
                              "or pass a path to a .toml file)")
    return shipped[name_or_path]


def load_recipe(name_or_path: str) -> Recipe:
    path = find_recipe(name_or_path)
    return validate_recipe(read_toml(path, "recipe"), path)


def validate_recipe(data: dict, path: Path) -> Recipe:
    for key, value in data.items():
        if key not in KEYS:
            raise GemmaQuantError(f"{path}: unknown key '{key}' (allowed: {', '.join(KEYS)})")
        typ = KEYS[key][0]
        ok = isinstance(value, typ) and not (typ in (int, float) and isinstance(value, bool))
        if typ is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if typ is list and ok:
            ok = all(isinstance(v, str) for v in value)
        if not ok:
            what = "a list of strings" if typ is list else typ.__name__
            raise GemmaQuantError(f"{path}: '{key}' must be {what}, got {value!r}")
    if "scheme" not in data:
        raise GemmaQuantError(f"{path}: missing required key 'scheme'")
    try:
        scheme = get_scheme(data["scheme"])
    except GemmaQuantError as e:
        raise GemmaQuantError(f"{path}: {e}") from None
    algo = data.get("algorithm")
    if algo is not None:
        allowed = scheme.allowed_algorithms
        if algo not in allowed:
            raise GemmaQuantError(f"{path}: algorithm {algo!r} does not apply to {scheme.name} "
                                  f"(allowed: {', '.join(allowed) or 'none'})")
    if data.get("imatrix") and not scheme.is_gguf:
        raise GemmaQuantError(f"{path}: 'imatrix' applies to GGUF schemes only, not {scheme.name}")
    if "alpha" in data and not 0 <= data["alpha"] <= 1:  # NaN fails this too
        raise GemmaQuantError(f"{path}: 'alpha' must be within 0..1, got {data['alpha']}")
    for k in ("calib_samples", "calib_len"):  # the same ranges as the options (limits.py)
        lo, hi = INT_OPTIONS["--" + k.replace("_", "-")]
        if k in data and not lo <= data[k] <= hi:
            raise GemmaQuantError(f"{path}: '{k}' must be in {lo}..{hi}, got {data[k]}")
    custom = {k: data[k] for k in SCHEME_KEYS if k in data}
    if custom:
        if scheme.is_gguf:
            raise GemmaQuantError(f"{path}: {', '.join(repr(k) for k in custom)} apply to compressed-tensors "
                                  f"schemes only, not {scheme.name}")
        try:
            scheme = scheme.customized(**custom)
        except GemmaQuantError as e:
            raise GemmaQuantError(f"{path}: {e}") from None
    settings = {k: v for k, v in data.items() if k not in ("scheme", "model", "description", *SCHEME_KEYS)}
    return Recipe(path.stem, path, scheme, settings, data.get("model"), data.get("description", ""))
