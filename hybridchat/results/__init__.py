"""Results as records: one JSON file per measured result under docs/results/ (command, commit, config
hash, machine, date, wall time, seeds, the table and a short text), rendered into docs/results.md by
`python -m hybridchat.results render` (`make results`). A record whose command composes to another
config today than when it was measured is marked stale in the rendering."""
