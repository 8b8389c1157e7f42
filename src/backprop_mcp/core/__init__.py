"""The core every other package stands on: the data shapes (`records`, `machine`, `answers`), the
one error tree (`errors`), the configuration (`settings` table, `parsers`, layered loading in
`config`), the JSON experiment store (`store`, its file primitives in `files`, its read-back
checks in `stored`) and the names of the script contract (`contract`). It imports nothing else of
the package. Stdlib-light by design: the supervisor and `backprop status` import it at start-up.
"""
