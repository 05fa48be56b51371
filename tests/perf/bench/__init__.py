"""`python3 -m tests.perf.bench`: measures a daemon from the outside, as an HTTP client of its API.

stats.py   percentiles, timing loops (one after another, or N workers at once), tables
memory.py  what the machine and the project's processes spend: MemAvailable, PSS, kernel
daemon.py  a private daemon to measure (temporary directories, a uid region and cgroup of its
           own), and its removal, leaving nothing behind
run.py     the workloads: create, exec, destroy, the lifecycle, throughput, idle memory

Nothing here imports the daemon's internals: the figures are what a client of the API sees.
"""
