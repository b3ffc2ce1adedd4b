"""A multi-node Ray cluster on one machine: a head and N worker nodes, each its own raylet, all on
127.0.0.1 — to try placement, a lost node and a re-submitted job before renting a cluster.

    python scripts/local_cluster.py --workers 2 --cpus 2          # prints the address; Ctrl-C stops it
    RAY_ADDRESS=127.0.0.1:PORT RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 \\
        python jobs/train.py --config cluster/train/tiny-cpu.yaml --placement-strategy STRICT_SPREAD

The head gets no CPUs, so workers and actors land on the worker nodes. Ray would swap a loopback
address for the machine's network address when a node joins; RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
(set here, and for the drivers you start) keeps every node and driver on 127.0.0.1.
Type `kill NODE` (a worker number, 1..N) to lose a node, `add` to join a new one.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, default=2, help="worker nodes")
    p.add_argument("--cpus", type=float, default=2, help="CPUs per worker node")
    p.add_argument("--gpus", type=int, default=0, help="GPUs per worker node")
    args = p.parse_args(argv)
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # read when ray is imported
    from ray.cluster_utils import Cluster

    node = {"num_cpus": args.cpus, "num_gpus": args.gpus, "node_ip_address": "127.0.0.1"}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "node_ip_address": "127.0.0.1",
                                                            "include_dashboard": False})
    workers = [cluster.add_node(**node) for _ in range(args.workers)]
    cluster.wait_for_nodes()
    print(f"cluster: head + {len(workers)} worker nodes at {cluster.address}\n"
          f"  export RAY_ADDRESS={cluster.address} RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0\n"
          "  commands: kill N | add | quit", flush=True)
    try:
        for line in sys.stdin:
            words = line.split()
            if words[:1] == ["kill"] and len(words) == 2 and words[1].isdigit() and 1 <= int(words[1]) <= len(workers):
                cluster.remove_node(workers[int(words[1]) - 1], allow_graceful=False)
                print(f"cluster: worker node {words[1]} killed", flush=True)
            elif words == ["add"]:
                workers.append(cluster.add_node(**node))
                print(f"cluster: worker node {len(workers)} joined", flush=True)
            elif words == ["quit"]:
                break
            elif words:
                print("cluster: commands: kill N | add | quit", flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
