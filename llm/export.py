"""Write a trained checkpoint as a Hugging Face Llama folder: the model leaves this code for the usual tools.

    python llm/export.py --checkpoint runs/llm/best.pt --out runs/llm/hf

The folder holds config.json, model.safetensors, generation_config.json, tokenizer.json (+ tokenizer_config.json)
and the SentencePiece tokenizer.model. transformers loads it with no custom code:

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("runs/llm/hf")
    tokenizer = AutoTokenizer.from_pretrained("runs/llm/hf")

and llama.cpp's convert_hf_to_gguf.py turns it into a GGUF file.
"""

import argparse
import sys
from pathlib import Path

from llm.chat_model import gguf_tokenizer_of
from llm.checkpoint import load_model, saved_tokenizer
from llm.hf import export_hf


def export_with_gguf_tokenizer(model, tokenizer, out: Path) -> Path:
    """A Hugging Face folder for a model fine-tuned from a GGUF file: the weights as export_hf writes them, the
    GGUF's byte-level BPE as tokenizer.json, and the chat template in tokenizer_config.json."""
    import os
    import shutil
    import tempfile

    from safetensors.torch import save_file

    from llm.hf import hf_config_from_ours, hf_tensors_from_ours, write_json

    special = tokenizer.special_tokens
    eos, bos = tokenizer.eos_id(), getattr(tokenizer, "bos", None)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        write_json(staging / "config.json", hf_config_from_ours(model.config, eos, bos))
        write_json(staging / "generation_config.json", {"bos_token_id": bos, "eos_token_id": eos})
        save_file(hf_tensors_from_ours(model), str(staging / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.tokenizer.save(str(staging / "tokenizer.json"))
        write_json(staging / "tokenizer_config.json", {
            "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model.config.context_length,
            "chat_template": tokenizer.chat_template, "add_bos_token": False, "clean_up_tokenization_spaces": False,
            **{name: special[name] for name in ("bos_token", "eos_token", "unk_token", "pad_token") if name in special},
        })
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="runs/llm/best.pt",
                        help="checkpoint written by llm/train.py (or model.pt of llm/sft.py / llm/dpo.py)")
    parser.add_argument("--out", required=True, help="folder to write (it must not exist, unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    args = parser.parse_args()
    out = Path(args.out)
    try:
        if out.exists() and not args.overwrite:
            raise ValueError(f"{out} already exists; choose another --out or pass --overwrite")
        model, checkpoint = load_model(args.checkpoint, "cpu")
        if checkpoint.get("tokenizer_gguf"):  # fine-tuned from a GGUF model: its byte-level BPE goes along
            export_with_gguf_tokenizer(model, gguf_tokenizer_of(checkpoint, args.checkpoint), out)
            print(f"wrote {out}: config.json, model.safetensors ({model.num_parameters():,} parameters, float32), "
                  f"tokenizer.json with the chat template")
            return
        export_hf(model, saved_tokenizer(checkpoint), out)
    except (ValueError, OSError) as error:  # CheckpointError is a ValueError
        sys.exit(f"error: {error}")
    print(f"wrote {out}: config.json, model.safetensors ({model.num_parameters():,} parameters, float32), "
          f"tokenizer.json, tokenizer.model")


if __name__ == "__main__":
    main()
