"""One root exception. Vendor errors are converted at the boundary with ``raise ... from err``."""


class SupportbotError(Exception):
    """Root of every error supportbot raises on purpose."""


class ConfigError(SupportbotError):
    """Settings are missing or wrong."""


class InputError(SupportbotError):
    """A user's or file's input cannot be used as given (empty, oversized, malformed)."""


class ModelError(SupportbotError):
    """The language model could not be loaded or could not generate."""


class GenerationTimeout(ModelError):
    """Generation ran past its time limit; the partial text is kept."""

    def __init__(self, message: str, partial: str = "") -> None:
        super().__init__(message)
        self.partial = partial


class BrokerUnavailable(SupportbotError):
    """The configured message broker cannot be reached."""


class RetrievalError(SupportbotError):
    """The ticket index could not be built, loaded or searched."""


class PrivacyError(SupportbotError):
    """Anonymization failed; the text must not travel further raw."""


class TrainingError(SupportbotError):
    """A training, export or evaluation run failed."""


class DeskError(SupportbotError):
    """A desk action cannot be done as asked (not a technician, no such escalation, already resolved)."""
