"""The parts of the crash certificate (``benchmarks/crash_certificate.py``).

- :mod:`.scenarios`: what each scenario saves or changes, its template and its operations.
- :mod:`.contents`: the tensors of every version, derived from the version number alone.
- :mod:`.oracle`: what the run or registry must hold after a sequence of operations.
- :mod:`.crash_points`: the calls at which a worker kills itself, and their count.
- :mod:`.worker`: the process that runs the operations and is killed.
- :mod:`.checks`: the process that checks the invariants after a kill.
- :mod:`.s3`: the S3 server, the faulty proxy in front of it and direct bucket access.
"""
