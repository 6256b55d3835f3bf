"""Validate an MMSafe-PO file and print what it holds.

    python -m bpo.data.inspect FILE [--image-root DIR] [--no-images] [--model DIR --max-length N]
                                    [--chat-template NAME_OR_FILE]

Prints the record count, the variant (`question` + `id` or `prompt`), a histogram of user turns per record, the
entity types, how many records carry a blind response, missing or undecodable images and, with --model, how many
prompts leave no room for a response under --max-length (bad) and how many responses would be truncated (counted,
not bad). With --model every record is also encoded as training encodes it and checked against the processor's own
tokenization of the whole conversation (image included): prompt + response tokens must be exactly what the model
sees, or the record is bad, with the differing tokens named; and the prompt budget: the rendered prompts' lengths
(system prompt and image tokens included) against --max-length, what the template alone writes (a default system
prompt such as Ministral-3's ~600 tokens) and the longest prompts by id. Then every bad record: file, line or index,
id, reason.

Exit status: 0 when every record is usable, 1 when some are not, 2 for usage errors (bad arguments, unreadable file).
"""

import argparse
import sys
from collections import Counter

import yaml

from bpo.data.records import BadRecord, DataFileError, RESPONSE_KEYS, load_records
from bpo.data.encode import PromptTooLong, encode_example, tokenize_text, verify_example
from bpo.data.conversation import Turn
from bpo.data.chat import ChatTemplateError, load_chat


def check_lengths(records, chat, image_root, max_length):
    """(prompts too long, records that fail to encode or whose tokens are not what the model sees, Counter of
    truncated responses by kind, {record id: prompt tokens} of the usable ones); the first two are lists of
    BadRecord."""
    from tqdm import tqdm

    too_long, failed, truncated, prompt_tokens = [], [], Counter(), {}
    for record in tqdm(records, desc="encoding", unit="rec", disable=None):
        try:
            example = encode_example(record, chat, image_root, max_length)
            verify_example(record, chat, image_root, example)
        except PromptTooLong as e:
            reason = f"prompt too long: {e.prompt_len} tokens (image tokens included), max_length {e.max_length}"
            too_long.append(BadRecord(record.source, record.id, reason))
            continue
        except (ValueError, OSError) as e:  # Template/Tokenization errors, an image that vanished since it was checked
            failed.append(BadRecord(record.source, record.id, f"cannot encode: {e}"))
            continue
        truncated.update(kind for kind, cut in example.truncated.items() if cut)
        prompt_tokens[record.id] = len(example.prompt_ids)
    return too_long, failed, truncated, prompt_tokens


def template_overhead(chat):
    """Tokens the chat template writes around a one-character question, no image: its system prompt (Ministral-3
    always writes one of ~600 tokens), role markers and generation prompt, which every prompt pays."""
    text = chat.render(chat.messages([Turn("user", ".")]), add_generation_prompt=True)
    return len(tokenize_text(chat.processor, text))


def budget_lines(max_length, prompt_tokens, overhead, longest=5):
    """The prompt budget: rendered prompt lengths (system prompt and image tokens included) against max_length."""
    if not prompt_tokens:
        return []
    ordered = sorted(prompt_tokens.items(), key=lambda kv: -kv[1])
    lengths = sorted(prompt_tokens.values())
    median = lengths[len(lengths) // 2]
    lines = [f"prompt tokens (system prompt and image tokens included) against max_length {max_length}: min "
             f"{lengths[0]}, median {median}, max {lengths[-1]}; the template alone writes {overhead} "
             f"({100 * overhead / max_length:.0f}% of the budget); a response keeps at least "
             f"{max_length - lengths[-1]} tokens",
             "longest prompts: " + ", ".join(f"{rid} {n}" for rid, n in ordered[:longest])]
    return lines


def _histogram(values):
    """"key: count, ..." with int keys in numeric order; other values as text (so lists in metadata still count)."""
    counter = Counter(v if isinstance(v, int) else str(v) for v in values)
    return ", ".join(f"{k}: {n}" for k, n in sorted(counter.items(), key=lambda kv: (isinstance(kv[0], str), kv[0])))


def summarize(path, records, bad, check_images, lengths=None):
    """The report as a list of lines; lengths is (max_length, prompts too long, Counter of truncated responses,
    the prompt budget's lines)."""
    lines = [f"file: {path}", f"records: {len(records)} usable, {len(bad)} bad"]
    lines.append("variant (conversation key): " + _histogram(r.meta["conversation_key"] for r in records))
    lines.append("user turns per record: " + _histogram(sum(t.role == "user" for t in r.turns) for r in records))
    lines.append("types: " + _histogram(r.meta.get("type", "(none)") for r in records))
    lines.append("entity types: " + _histogram(r.meta.get("entity_type", "(none)") for r in records))
    with_blind = sum(r.blind is not None for r in records)
    lines.append(f"blind responses: {with_blind} with, {len(records) - with_blind} without")
    if check_images:
        missing = sum(b.reason.startswith("missing image") for b in bad)
        undecodable = sum(b.reason.startswith("undecodable image") for b in bad)
        lines.append(f"images: {missing} missing, {undecodable} undecodable")
    else:
        lines.append("images: not checked (--no-images)")
    if lengths is not None:
        max_length, too_long, truncated, budget = lengths
        cut = ", ".join(f"{kind} {truncated[kind]}" for kind in RESPONSE_KEYS)
        lines.append(f"length budget {max_length}: {too_long} prompts too long; truncated responses: {cut}")
        lines += budget
    if bad:
        lines.append("bad records:")
        lines += [f"  {b}" for b in bad]
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file")
    parser.add_argument("--image-root", help="directory the image names are relative to (default: current directory)")
    parser.add_argument("--split", default="",
                        help="as data.split: the split of a dataset folder (SPLIT or CONFIG/SPLIT)")
    parser.add_argument("--image-cache", default="",
                        help="as data.image_cache: where inline images are extracted (default: the data file's folder)")
    parser.add_argument("--no-images", action="store_true", help="do not open the images")
    parser.add_argument("--model", help="checkpoint directory whose processor measures the length budget")
    parser.add_argument("--max-length", type=int, help="token budget per prompt + response (needs --model)")
    parser.add_argument("--chat-template", default="",
                        help="as data.chat_template: a shipped template's name (vicuna_v1) or a Jinja file")
    parser.add_argument("--chat-template-kwargs", default="{}",
                        help="as data.chat_template_kwargs: a YAML mapping, e.g. '{enable_thinking: false}'")
    args = parser.parse_args(argv)
    if (args.model is None) != (args.max_length is None):
        parser.error("--model and --max-length go together")
    if args.model is not None and args.no_images:
        parser.error("--model counts image tokens, so it needs the images (drop --no-images)")
    if args.max_length is not None and args.max_length < 1:
        parser.error("--max-length must be positive")
    try:
        template_kwargs = yaml.safe_load(args.chat_template_kwargs)
    except yaml.YAMLError:
        template_kwargs = None
    if not isinstance(template_kwargs, dict):
        parser.error("--chat-template-kwargs must be a YAML mapping, e.g. '{enable_thinking: false}'")

    try:
        records, bad = load_records(args.file, args.image_root, check_images=not args.no_images, progress=True,
                                   split=args.split, image_cache=args.image_cache)
    except DataFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    lengths = None
    if args.model is not None:
        try:
            chat = load_chat(args.model, args.chat_template, template_kwargs=template_kwargs)
        except ChatTemplateError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(chat.describe(), file=sys.stderr)
        too_long, failed, truncated, prompt_tokens = check_lengths(records, chat, args.image_root, args.max_length)
        bad = bad + too_long + failed
        unusable = {b.id for b in too_long + failed}
        records = [r for r in records if r.id not in unusable]
        budget = budget_lines(args.max_length, prompt_tokens, template_overhead(chat))
        lengths = (args.max_length, len(too_long), truncated, budget)
    print("\n".join(summarize(args.file, records, bad, not args.no_images, lengths)))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
