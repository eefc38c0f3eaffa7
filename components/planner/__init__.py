"""The stage planner: how many encode, prefill and decode instances a workload needs, where
they run, and (on Kubernetes) setting the stage Deployments' replicas from live signals."""
