"""The test and benchmark fleet harness: not part of the installed product (pyproject lists the
product packages; tests and benches find this one on sys.path from the repository root).

    procs   the product's launcher (kvfleet/procs.py) re-exported, plus what a harness reads about
            a process: free ports, CPU seconds, RSS and descriptors from /proc, "is it serving"
    fleet   a fleet for a test: replica subprocesses, an in-process balancer, HTTP and SSE helpers
    chaos   fault injection and soak runs under load (tests/test_faults.py, test_soak.py,
            bench/bench_faults.py, bench_soak.py)

The local fleet a user runs (`kvfleet fleet up`, `kvfleet demo`) is product code: kvfleet/fleet.py.
"""
