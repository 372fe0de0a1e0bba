"""Commands over a whole run directory that neither record nor analyze it: ``trajscope validate``
(:mod:`trajscope.tools.validate`) and ``trajscope convert`` (:mod:`trajscope.tools.convert`)."""
