"""fedllm-flwr: federated fine-tuning of LLM adapters with Flower, peft and Hydra."""

import logging

__version__ = "0.1.0"


def _not_a_hub_kernel_notice(record: logging.LogRecord) -> bool:
    return "kernels-community" not in record.getMessage()


# bitsandbytes' CPU backend, on CPUs with AVX512-BF16, fetches a 4-bit kernel from the
# Hugging Face Hub through the optional `kernels` package and, without it, logs on import
# that the user should install it; nothing here fetches from the Hub at run time, and
# bitsandbytes goes on with its own CPU kernel. A filter on that one message, installed
# on import because every module that imports peft imports bitsandbytes with it.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_not_a_hub_kernel_notice)


_QUIET = False


def quiet_third_party_output() -> None:
    """Silence per-load progress bars and deprecation chatter from HF libraries.

    Called by the apps and the CLI (not on import), so a user's own process
    keeps whatever verbosity it chose. Only the first call does anything.
    """
    global _QUIET
    if _QUIET:
        return
    _QUIET = True
    import warnings

    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\..*")
    # peft's prefix tuning still hands its prefix over as `past_key_values`.
    warnings.filterwarnings("ignore", message=".*past_key_values.*", category=FutureWarning)
    # bitsandbytes' 8-bit matmul says so on every call (model.quantization=8bit).
    warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
