"""User-facing errors. Each message says what is wrong, where, and how to fix it; the CLI
prints it on one line and exits 1 (a traceback only when asked)."""


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's message (its type's name when it has none), at most
    ``limit`` characters: what a one-line error quotes of torch's or onnxruntime's long reports."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]


def first_paragraph(exc: BaseException) -> str:
    """The message's first paragraph as one line (transformers wraps its sentences over lines)."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    return " ".join(line.strip() for line in text.split("\n\n")[0].splitlines() if line.strip())


def error_line(exc: BaseException) -> str:
    """An error as the command line prints it: our own errors' message, another's type too."""
    if isinstance(exc, KeyboardInterrupt):
        return f"interrupted ({exc})"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return text if isinstance(exc, AwqGraphError) else f"{type(exc).__name__}: {text}"


class AwqGraphError(Exception):
    """Base class of every error a user can cause."""


class InputError(AwqGraphError):
    """The model path, calibration file or output folder is unusable."""


class SchemeError(AwqGraphError):
    """An unsupported bit width, group size or scheme name."""


class ConfigError(AwqGraphError):
    """A Quark-format AWQ config that does not fit the model's graph."""


class ExportError(AwqGraphError):
    """torch.export could not capture the model."""


class InterpretError(AwqGraphError):
    """A graph node failed while the interpreter ran it."""
