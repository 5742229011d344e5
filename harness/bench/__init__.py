"""Load through fooproxy: ``make bench`` (bench, loadgen) and ``make load`` (swarm, locustfile)."""
