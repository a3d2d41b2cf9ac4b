"""Train a task-routed ALoRA adapter with TRL's SFTTrainer on JSONL data with a task column (docs/trainer.md).

Each JSONL line holds ``prompt``, ``completion`` and ``task`` (a name of --tasks); batches mix tasks and each
example is routed to its task's expert. Runs offline on the built-in SmolLM2-135M-Instruct:

    python examples/trl_sft.py --steps 20

Prints the completion loss on the data before and after training, and saves the adapter to --output-dir
(load it with ``PeftModel.from_pretrained(base, output_dir)`` after ``import asymlora``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from datasets import load_dataset
from trl import SFTConfig

from asymlora import AsymLoraConfig, models
from asymlora.hf import AsymLoraSFTTrainer

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(HERE / "tasks.jsonl"), help="JSONL with prompt, completion, task")
    p.add_argument(
        "--tasks", default="reverse,upper,add", help="task names, one expert each (comma-separated)"
    )
    p.add_argument("--model", default="smollm2-135m", help="built-in name or local model directory")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--output-dir", default="runs/trl_sft")
    args = p.parse_args(argv)

    model, tokenizer = models.load(args.model)
    data = load_dataset("json", data_files=args.data, split="train")
    config = AsymLoraConfig(
        method="alora",
        router="task",
        task_names=args.tasks.split(","),
        num_experts=len(args.tasks.split(",")),
        target_modules=["q_proj", "v_proj", "o_proj"],
    )
    sft = SFTConfig(
        output_dir=args.output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=4,
        learning_rate=args.lr,
        logging_steps=5,
        save_strategy="no",
        report_to=[],
        gradient_checkpointing=False,  # a 135M model on CPU: speed over memory
        use_cpu=True,
        bf16=False,  # SFTConfig defaults to bf16 autocast, slow on most CPUs
    )
    trainer = AsymLoraSFTTrainer(
        model=model,
        args=sft,
        peft_config=config,
        train_dataset=data,
        eval_dataset=data,
        processing_class=tokenizer,
    )
    before = trainer.evaluate()["eval_loss"]
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    after = trainer.evaluate()["eval_loss"]
    trainer.save_model(args.output_dir)
    print(f"completion loss {before:.4f} -> {after:.4f} after {args.steps} steps in {seconds:.1f} s")
    print(f"adapter saved to {args.output_dir}")


if __name__ == "__main__":
    main()
