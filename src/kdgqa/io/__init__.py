"""Files in and out: durable writes, weights, base-model records, model sources, kdgqa
checkpoints and plain-MHA export."""
