"""Secrets out of everything kiln writes: the resolved config goes to resolved_config.yaml, every
checkpoint's meta.json and the W&B run, and `${oc.env:TOKEN}` or `https://user:token@...` in it
would put a credential in plain text in all three.

Redacted (on the driver, once, where the environment that resolved the config is): the value of
every environment variable whose name says it is a credential (TOKEN, SECRET, PASSWORD, API_KEY,
...), wherever it appears in a string; the password of a URL's user info; the values of URL query
parameters that carry credentials (token, signature, X-Amz-Signature, ...).
"""

from __future__ import annotations

import os
import re

SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSW|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY|CREDENTIAL|AUTH|SIGNATURE",
                         re.IGNORECASE)
URL_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^/\s:@]*:)[^/\s@]+@", re.IGNORECASE)
QUERY_SECRET = re.compile(r"(?P<key>[?&](?:[a-z0-9_-]*(?:token|signature|secret|password|passwd|key|sig|"
                          r"credential))=)[^&\s#'\"]+", re.IGNORECASE)
MIN_SECRET_LENGTH = 6  # shorter values ("1", "true") would blank out ordinary settings


def secret_values(environ=None) -> list[tuple[str, str]]:
    """(value, variable name) of the credentials in the environment, longest first."""
    env = os.environ if environ is None else environ
    found = [(v, k) for k, v in env.items() if SECRET_NAME.search(k) and len(v) >= MIN_SECRET_LENGTH]
    return sorted(found, key=lambda p: -len(p[0]))


def redact_text(text: str, secrets: list[tuple[str, str]] | None = None) -> str:
    """`text` with credentials replaced (error messages, saved files); secrets: secret_values()'s."""
    for value, name in secret_values() if secrets is None else secrets:
        text = text.replace(value, f"<redacted ${name}>")
    text = URL_PASSWORD.sub(lambda m: m.group("head") + "<redacted>@", text)
    return QUERY_SECRET.sub(lambda m: m.group("key") + "<redacted>", text)


def redact(value, secrets: list[tuple[str, str]] | None = None):
    """`value` (plain data: dicts, lists, strings, numbers) with every credential replaced."""
    secrets = secret_values() if secrets is None else secrets
    if isinstance(value, str):
        return redact_text(value, secrets)
    if isinstance(value, dict):
        return {k: redact(v, secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v, secrets) for v in value)
    return value
