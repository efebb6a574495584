"""Re-cutting the running cluster from plan epoch e to e+1: the pure diff, the orchestrator's steps
over the slots' control service, and the per-reconfiguration report."""
