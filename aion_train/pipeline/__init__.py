"""The post-training pipeline as a Ray job: SFT -> reward model -> PPO -> retrieval index ->
policy bundle (`aion-train pipeline`). phases.py lists the phases and their resource requests,
runner.py drives them (tasks / actor groups, skip-if-done, failure reports), worker.py is
what runs inside a Ray worker, local_cluster.py starts and stops a private loopback head
node by PID, submit.py submits the pipeline as a Ray job. See docs/pipeline.md."""
