"""One record through the stages: text-only preference record -> MMSafe-PO record, or a drop naming its stage.

    builder = Builder(recognizer, images, rewriter, phrases, image_dir)
    row = builder.build(source)      # {"origin", "id", "record": {...}} or {"origin", "id", "dropped", "fields"}

Stages, each writing its field of the record (a dropped row keeps the fields it had, to trace it):
1. entity (bpo.build_data.entity) on the last user turn, kept as `text_prompt`: `entity`, `entity_type`;
2. image (bpo.build_data.images): `image` (a name under build.image_dir, where the file is copied once the record
   has passed the stages after this one) and `image_source`;
3. replace (bpo.build_data.replace): every mention of the entity, in every turn of the conversation (so no earlier
   turn gives the name away either), becomes the type's phrase, `replacement`; the last user turn after it is
   `mid_prompt`. A history turn that still names the entity (a person's surname alone) drops the record (`leak`):
   the rewrite only rewrites the last turn;
4. rewrite (bpo.build_data.rewrite) of `mid_prompt` into the final last user turn;
5. check: `question` is the Vicuna conversation, the image in the last user turn ("USER: <image>\\n..."); it must
   read back as the same turns (bpo.data.conversation), name the entity in no turn, and be a record
   bpo.data.records takes with its image (the rule every job applies). `chosen` and `rejected` are the input's
   responses, prefixed "ASSISTANT: ", unchanged: they may name the entity.

`trace` records the answers asked per stage and the mentions replaced.
"""

from bpo.build_data.replace import named_in, replace_mentions
from bpo.build_data.report import Drop
from bpo.data.conversation import ConversationError, Turn, format_conversation, parse_conversation
from bpo.data.records import record_problem


class Builder:
    def __init__(self, recognizer, images, rewriter, phrases, image_dir):
        self.recognizer, self.images, self.rewriter = recognizer, images, rewriter
        self.phrases, self.image_dir = phrases, image_dir

    def build(self, source):
        fields, trace, stage = {}, {}, "entity"
        try:
            request = source.turns[-1].text
            fields["text_prompt"] = request
            entity, kind, trace["entity_attempts"] = self.recognizer.recognize(request, source)
            fields.update(entity=entity, entity_type=kind)

            stage = "image"
            found = self.images.lookup(entity)
            fields.update(image=found.name, image_source=found.source)

            stage = "replace"
            phrase = self.phrases[kind]
            turns, mentions = [], 0
            for turn in source.turns:
                text, n = replace_mentions(turn.text, entity, phrase)
                turns.append(Turn(turn.role, text))
                mentions += n
            fields.update(replacement=phrase, mid_prompt=turns[-1].text)
            trace["mentions_replaced"] = mentions
            for k, turn in enumerate(turns[:-1], start=1):
                name = named_in(turn.text, entity, kind)
                if name:
                    raise Drop("leak", f"turn {k} ({turn.role}) still names {name!r} after replacement, and only "
                                       f"the last turn is rewritten")

            stage = "rewrite"
            question, trace["rewrite_attempts"] = self.rewriter.rewrite(turns[-1].text, entity, kind, phrase)

            stage = "check"
            record = self._record(source, turns[:-1] + [Turn("user", question, has_image=True)], fields, entity,
                                  kind, trace, found)
        except Drop as d:
            return {"origin": source.origin, "id": source.id, "fields": {**fields, "trace": trace},
                    "dropped": {"stage": stage, "code": d.code, "reason": d.reason}}
        return {"origin": source.origin, "id": source.id, "record": record}

    def _record(self, source, turns, fields, entity, kind, trace, found):
        question = format_conversation(turns)
        try:
            read_back = parse_conversation(question)
        except ConversationError as e:
            read_back = f"unparsable: {e}"
        if read_back != turns:
            raise Drop("conversation", "the conversation does not read back as the same turns (a turn holds a "
                                       "USER: / ASSISTANT: marker or <image>)")
        for k, turn in enumerate(turns, start=1):
            name = named_in(turn.text, entity, kind)
            if name:
                raise Drop("leak", f"turn {k} ({turn.role}) names {name!r}")
        record = {"id": source.id, "question": question, "image": fields["image"],
                  "chosen": "ASSISTANT: " + source.chosen, "rejected": "ASSISTANT: " + source.rejected,
                  **{k: v for k, v in fields.items() if k != "image"}, "origin": source.origin, "trace": trace}
        self.images.store(found)  # only now: image_dir holds no picture of a record dropped before this check
        problem = record_problem(record, image_root=self.image_dir)
        if problem:
            raise Drop("invalid_record", problem)
        return record
