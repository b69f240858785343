"""Post-training: LoRA / QLoRA adapters, the checkable chat task, SFT, the reward model (and PPO).

Final signatures (the contract between the phases):

lora.py      apply_lora(model, lora_cfg, seed=0) -> list[str]   wrap target linears (nn.Linear,
                 ColumnParallelLinear, RowParallelLinear; call after `parallelize`) in place,
                 freeze everything else; weight/bias keep their names, adapters add
                 '<module>.lora_A' [r, in] and '<module>.lora_B' [out, r]
             lora_state_dict(model) -> dict[str, Tensor]        this rank's adapter tensors
             gather_lora_state_dict(model) -> dict[str, Tensor] full adapters (TP all-gather; collective)
             load_lora_state_dict(model, sd)                    local-shard or full tensors
             merge_lora(model) / unmerge_lora(model)            W0 + (alpha/r) B A; unmerge restores W0 exactly
             lora_modules(model) -> {name: LoRALinear}, trainable_parameters(model)
qlora.py     quantize_base_nf4(model, block_size=64) -> {"nf4_bytes","bf16_bytes","ratio","layers"}
             (after apply_lora: the adapted layers' frozen bases become torchao NF4, dequantised in forward)
task.py      build_task_data(cfg) -> TaskData(tokenizer: ChatTokenizer, splits)
             TaskData.prompts(split) -> list[Example]   splits: "train", "test" (held-out), "chat"
             TaskData.records: the user's files (user_data.py): "sft_train", "sft_eval", "sft_extra"
                 (Conversation), "rm_train", "rm_eval" (Preference); PPO prompts are "train" / "test"
             Example: .messages, .prompt_ids, .answer, .candidates, .kind ("yes_no"|"color"|"shape"|"chat"),
                      .conversation(response=None)
             is_correct(example, generated_text) -> bool
             render_chat(messages, tokenizer, add_generation_prompt=True) -> list[int]   (chat_template.py)
             render_example(messages, tokenizer) -> (ids, response_mask)
             render_conversation(messages, tokenizer) -> (ids, mask of every assistant turn)
             ChatTokenizer: .encode/.decode, .end_id (= eos, stops generation), .pad_id, .vocab_size
common.py    setup_distributed(cfg) -> ParallelGroups         (deepspeed_adapter.init_comm)
             build_parallel_model(cfg, groups) -> Transformer (seeded, parallelized, not yet loaded)
             phase_config(cfg, lr=, steps=, batch_size=) -> Config copy for build_engine
             build_phase_engine(model, phase_cfg, groups) -> (engine, optimizer)  trainable params only
                 (works with frozen MoE experts: DeepSpeed's MoE shim is switched off then)
             train_steps(engine, optimizer, phase_cfg.train, steps, next_batch, loss_fn, log) -> losses
             generate_answers(model, prompt_ids_list, max_new_tokens, eos_id, groups=None,
                              temperature=0.0, generator=None) -> list[list[int]]  (KV-cached, length buckets)
             evaluate_accuracy(model, task_data, examples, max_new_tokens, groups=None) -> dict
                 {"accuracy", "n", "by_kind": {...}}  (examples split over DP ranks, counts all-reduced)
             sequence_logprobs(model, input_ids, groups=None) -> [B, T-1] log p(token t+1 | <= t) (full vocab)
             pad_right(seqs, pad_id) -> (ids [B, T], mask [B, T])
             phase_dir(cfg, phase), read_done(cfg, phase), write_done(cfg, phase, metrics) (atomic, rank 0)
             phase_tracker(cfg, phase, groups) -> Tracker (one MLflow db at {run_dir}/mlflow.db)
             save_weights(model, cfg, groups, folder) / load_weights(model, folder) (any TP/EP layout)
sft.py       run_sft(cfg) -> dict   {"sft_accuracy", "sft_loss", ...}; writes {run_dir}/sft/done.json
             load_policy(cfg, stage="sft", merge=False, groups=None) -> (model, task_data)
                 merge=False: SFT adapters loaded (trainable), base frozen;
                 merge=True: a plain model with W0 + (alpha/r) B A (apply_lora again for a fresh actor)
reward.py    RewardModel(backbone, d_model)  forward(input_ids, attention_mask) -> rewards [B]
                 (right-padded; the score is read at the last token where attention_mask == 1)
             run_rm(cfg) -> dict {"rm_pair_accuracy", ...}; writes {run_dir}/rm/done.json
             load_reward_model(cfg, groups=None) -> RewardModel (frozen, eval mode)
rewards.py   FunctionReward("pkg.module:function"): ppo.reward as fn(prompts, completions, **columns)
             exact_match, regex_match (checkable rewards)
user_data.py read_conversations / read_preferences / read_prompts(key, patterns): the user's
                 JSONL, every bad record named FILE:LINE: field; check_phase_files(cfg, phases)

Every run_* is SPMD (one call per rank, torch.distributed initialised through
`aion_train.parallel.deepspeed_adapter.init_comm` when WORLD_SIZE > 1); only rank 0 writes files
and talks to MLflow; `done.json` is written atomically as a phase's very last act.
"""
