"""SentencePiece's ModelProto, declared with protobuf's descriptor API instead of imported.

sentencepiece ships `sentencepiece_model_pb2`, generated for one protobuf major version (7.x in
0.2.3), and refuses other runtimes; py-libp2p needs protobuf < 7. Declaring the few messages and
fields we write (same names and numbers as sentencepiece_model.proto) lets the protobuf library
serialize them under any runtime version.
"""

from __future__ import annotations

from functools import lru_cache

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

F = descriptor_pb2.FieldDescriptorProto


def _field(msg, name, number, ftype, label=F.LABEL_OPTIONAL, type_name=None):
    f = msg.field.add(name=name, number=number, type=ftype, label=label)
    if type_name:
        f.type_name = type_name


@lru_cache(maxsize=1)
def model_proto_class():
    """The ModelProto message class (proto2, package gguf_fragments.sentencepiece)."""
    fd = descriptor_pb2.FileDescriptorProto(name="gguf_fragments_sentencepiece_model.proto",
                                            package="gguf_fragments.sentencepiece", syntax="proto2")
    trainer = fd.message_type.add(name="TrainerSpec")
    model_type = trainer.enum_type.add(name="ModelType")
    for name, number in (("UNIGRAM", 1), ("BPE", 2), ("WORD", 3), ("CHAR", 4)):
        model_type.value.add(name=name, number=number)
    _field(trainer, "model_type", 3, F.TYPE_ENUM, type_name=".gguf_fragments.sentencepiece.TrainerSpec.ModelType")
    _field(trainer, "vocab_size", 4, F.TYPE_INT32)
    _field(trainer, "byte_fallback", 35, F.TYPE_BOOL)
    _field(trainer, "unk_id", 40, F.TYPE_INT32)

    normalizer = fd.message_type.add(name="NormalizerSpec")
    _field(normalizer, "name", 1, F.TYPE_STRING)
    _field(normalizer, "add_dummy_prefix", 3, F.TYPE_BOOL)
    _field(normalizer, "remove_extra_whitespaces", 4, F.TYPE_BOOL)
    _field(normalizer, "escape_whitespaces", 5, F.TYPE_BOOL)

    model = fd.message_type.add(name="ModelProto")
    piece = model.nested_type.add(name="SentencePiece")
    piece_type = piece.enum_type.add(name="Type")
    for name, number in (("NORMAL", 1), ("UNKNOWN", 2), ("CONTROL", 3), ("USER_DEFINED", 4), ("UNUSED", 5),
                         ("BYTE", 6)):
        piece_type.value.add(name=name, number=number)
    _field(piece, "piece", 1, F.TYPE_STRING)
    _field(piece, "score", 2, F.TYPE_FLOAT)
    _field(piece, "type", 3, F.TYPE_ENUM, type_name=".gguf_fragments.sentencepiece.ModelProto.SentencePiece.Type")
    _field(model, "pieces", 1, F.TYPE_MESSAGE, F.LABEL_REPEATED, ".gguf_fragments.sentencepiece.ModelProto.SentencePiece")
    _field(model, "trainer_spec", 2, F.TYPE_MESSAGE, type_name=".gguf_fragments.sentencepiece.TrainerSpec")
    _field(model, "normalizer_spec", 3, F.TYPE_MESSAGE, type_name=".gguf_fragments.sentencepiece.NormalizerSpec")

    pool = descriptor_pool.DescriptorPool()
    pool.Add(fd)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("gguf_fragments.sentencepiece.ModelProto"))
