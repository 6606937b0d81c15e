"""The learned exit policy: rollouts cached from the model, GREEN-CODE's exit environment in
pure JAX, PPO (RLax + Optax) under one `jit`, per-device rollouts with `shard_map`.

    collect_rollouts(checkpoint, data_dir, out_dir, ...)   # rl.collect: the model, once
    train_policy(rollouts_dir, out_dir, config, ...)      # rl.train: arrays only
    gc.policies.Learned.load(out_dir, threshold=0.9)       # what generation decides with
"""
