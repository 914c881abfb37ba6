#!/bin/sh
# The test stack's stand-in for the launcher's run-cluster-node.sh (a user's real stack
# declares the one of their own checkout of eugr/spark-vllm-docker instead): bring up
# this container's Ray node, a head or a worker joining one, in the foreground, as the
# field's launcher expects of the script it runs in each node's container.
#   run-cluster-node.sh --role head --host-ip ADDR [--port 6379]
#   run-cluster-node.sh --role worker --head-ip ADDR --host-ip ADDR [--port 6379]
set -eu
role= host_ip= head_ip= port=6379
while [ $# -gt 0 ]; do
  case "$1" in
    --role) role=$2; shift 2 ;;
    --host-ip) host_ip=$2; shift 2 ;;
    --head-ip) head_ip=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    --eth-if|--ib-if) shift 2 ;;  # the fabric's interfaces: the bed has none
    *) echo "run-cluster-node.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -n "$host_ip" ] || { echo "run-cluster-node.sh: --host-ip is required" >&2; exit 2; }
case "$role" in
  head)
    exec ray start --head --block --node-ip-address="$host_ip" --port="$port" \
      --num-cpus=1 --include-dashboard=false --disable-usage-stats ;;
  worker)
    [ -n "$head_ip" ] || { echo "run-cluster-node.sh: --head-ip is required" >&2; exit 2; }
    exec ray start --block --address="$head_ip:$port" --node-ip-address="$host_ip" \
      --num-cpus=1 --disable-usage-stats ;;
  *) echo "run-cluster-node.sh: --role head|worker" >&2; exit 2 ;;
esac
