"""Commands over a whole run directory that neither record nor analyze it: ``trajscope validate``
(:func:`validate_run`, :mod:`~trajscope.tools.validate`) and ``trajscope convert``
(:func:`convert_run`, :mod:`~trajscope.tools.convert`, which writes through the recorder's storage
writers)."""

from __future__ import annotations

from trajscope.tools.convert import convert_run
from trajscope.tools.validate import ValidationReport, validate_run

__all__ = ["ValidationReport", "convert_run", "validate_run"]
