#!/usr/bin/env bash
# A head and N extra worker nodes on this machine (loopback), e.g. to try SPREAD placement.
#   cluster/local_cluster.sh start 2   # head + 2 workers, 1 CPU each
#   cluster/local_cluster.sh stop
set -euo pipefail
cmd=${1:-start}; workers=${2:-2}
port=${RAY_PORT:-6379}
case "$cmd" in
  start)
    ray start --head --port="$port" --node-ip-address=127.0.0.1 --num-cpus=1 --dashboard-host=127.0.0.1
    for _ in $(seq "$workers"); do
      ray start --address="127.0.0.1:$port" --node-ip-address=127.0.0.1 --num-cpus=1
    done
    echo "export RAY_ADDRESS=127.0.0.1:$port   # then run any cube command"
    ;;
  stop) ray stop ;;
  *) echo "usage: $0 start [N] | stop" >&2; exit 2 ;;
esac
