"""Privacy layer: nothing personal reaches the queue, the database, the logs or the training data.

    anonymizer = Anonymizer.from_settings(settings)        # once per process
    result = anonymizer.anonymize(text, scope="slack:C123:1700000.1")
    anonymizer.add_known_names(["Priya Raman", "jdoe"])    # member directory
    anonymizer.reveal(result.text, scope=...)              # only inside the adapter process
    scrub(text)                                            # second pass before training data is written
    contains_secret(text)                                  # credentials in it? (cheap: regexes only)

Loading Presidio and spaCy is deferred to ``Anonymizer(...)``: importing this package is cheap.
"""

from bot.privacy.anonymizer import Anonymizer, default_anonymizer, scrub
from bot.privacy.config import PrivacyConfig
from bot.privacy.secrets import contains_secret

__all__ = ["Anonymizer", "PrivacyConfig", "contains_secret", "default_anonymizer", "scrub"]
