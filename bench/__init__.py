"""queuejob's benchmarks: each figure measured beside its baseline, `python -m bench`.

Figures (one module each): `bench.fill` (1, fill rate), `bench.memory` (2, fill memory),
`bench.detection` (3, completion detection), `bench.overhead` (4, per-item overhead),
`bench.flow_overhead` (5, flow overhead) and `bench.scale` (6, a 100,000-item run).
`bench.child` is the program the memory and flow figures measure in a child process, and
`bench.report` writes ``bench/results.json``, ``bench/RESULTS.md`` and the README's section.
"""
