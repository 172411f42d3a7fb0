"""The stage programs that run in the containers (and as subprocesses of the local backend).

Each is `python -m tunectl_jobs.<stage> --recipe FILE --store URI --run ID`: it reads its inputs from the
artifact store, writes its outputs there, and writes its manifest last.
"""
