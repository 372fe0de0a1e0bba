"""Reading a recorded run: the run directory, its snapshots and the storage formats they are read from.

Nothing here imports the analyzer or the recorder's write path. See ``docs/architecture.md``.
"""
