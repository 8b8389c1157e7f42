"""The runs: the use-cases (`service`, the one API both adapters call), how a script is started
(`launch`), the per-run supervisor process (`supervisor`, split by phase), the script's events,
progress, outcome and log (`events`, `progress`, `outcome`, `runlog`), comparing runs, importing
the seed's store (`legacy`) and the allowed-roots rule (`confine`). It may import `backends`,
`governor` and `core`; `backends` and `runs` are one layer, so a module cycle between them still
counts as a cycle.
"""
