"""Real stand-ins for what a cluster provides, shared by the rollout tests and ``drainproxy demo``:
a legacy app, the kubelet's termination sequence, a load balancer and a never-retrying client."""
