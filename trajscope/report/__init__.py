"""Presenting an analysis: the headline and summary table (:mod:`~trajscope.report.summary`), the
paper-style figures (:mod:`~trajscope.report.figures`) and the report page
(:mod:`~trajscope.report.page`)."""
