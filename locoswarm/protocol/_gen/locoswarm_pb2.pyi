from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Reason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REASON_UNSPECIFIED: _ClassVar[Reason]
    REASON_MALFORMED: _ClassVar[Reason]
    REASON_VERSION: _ClassVar[Reason]
    REASON_WRONG_RUN: _ClassVar[Reason]
    REASON_FINGERPRINT: _ClassVar[Reason]
    REASON_STALE_ROUND: _ClassVar[Reason]
    REASON_UNKNOWN_CODEC: _ClassVar[Reason]
    REASON_TOO_LARGE: _ClassVar[Reason]
    REASON_SIZE_MISMATCH: _ClassVar[Reason]
    REASON_CHUNK_TOO_LARGE: _ClassVar[Reason]
    REASON_TOO_MANY_CHUNKS: _ClassVar[Reason]
    REASON_OUT_OF_ORDER: _ClassVar[Reason]
    REASON_BAD_CHECKSUM: _ClassVar[Reason]
    REASON_TRUNCATED: _ClassVar[Reason]
    REASON_BUSY: _ClassVar[Reason]
    REASON_SHUTTING_DOWN: _ClassVar[Reason]
    REASON_UNAUTHENTICATED: _ClassVar[Reason]
    REASON_REJECTED: _ClassVar[Reason]
    REASON_INTERNAL: _ClassVar[Reason]
    REASON_TIMEOUT: _ClassVar[Reason]
REASON_UNSPECIFIED: Reason
REASON_MALFORMED: Reason
REASON_VERSION: Reason
REASON_WRONG_RUN: Reason
REASON_FINGERPRINT: Reason
REASON_STALE_ROUND: Reason
REASON_UNKNOWN_CODEC: Reason
REASON_TOO_LARGE: Reason
REASON_SIZE_MISMATCH: Reason
REASON_CHUNK_TOO_LARGE: Reason
REASON_TOO_MANY_CHUNKS: Reason
REASON_OUT_OF_ORDER: Reason
REASON_BAD_CHECKSUM: Reason
REASON_TRUNCATED: Reason
REASON_BUSY: Reason
REASON_SHUTTING_DOWN: Reason
REASON_UNAUTHENTICATED: Reason
REASON_REJECTED: Reason
REASON_INTERNAL: Reason
REASON_TIMEOUT: Reason

class TensorSpec(_message.Message):
    __slots__ = ("name", "codec", "dtype", "shape", "num_bytes", "block_size", "k_per_chunk")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    NUM_BYTES_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    K_PER_CHUNK_FIELD_NUMBER: _ClassVar[int]
    name: str
    codec: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    num_bytes: int
    block_size: int
    k_per_chunk: int
    def __init__(self, name: _Optional[str] = ..., codec: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., num_bytes: _Optional[int] = ..., block_size: _Optional[int] = ..., k_per_chunk: _Optional[int] = ...) -> None: ...

class Header(_message.Message):
    __slots__ = ("protocol_version", "run_id", "outer_step", "strategy", "sender_id", "model_fingerprint", "tensors", "total_bytes", "chunk_bytes", "num_chunks", "kind", "members", "tokens")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    OUTER_STEP_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    SENDER_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    run_id: str
    outer_step: int
    strategy: str
    sender_id: str
    model_fingerprint: str
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    total_bytes: int
    chunk_bytes: int
    num_chunks: int
    kind: str
    members: _containers.RepeatedScalarFieldContainer[str]
    tokens: int
    def __init__(self, protocol_version: _Optional[int] = ..., run_id: _Optional[str] = ..., outer_step: _Optional[int] = ..., strategy: _Optional[str] = ..., sender_id: _Optional[str] = ..., model_fingerprint: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., total_bytes: _Optional[int] = ..., chunk_bytes: _Optional[int] = ..., num_chunks: _Optional[int] = ..., kind: _Optional[str] = ..., members: _Optional[_Iterable[str]] = ..., tokens: _Optional[int] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("index", "data")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    index: int
    data: bytes
    def __init__(self, index: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class Trailer(_message.Message):
    __slots__ = ("total_bytes", "num_chunks", "crc32")
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    total_bytes: int
    num_chunks: int
    crc32: int
    def __init__(self, total_bytes: _Optional[int] = ..., num_chunks: _Optional[int] = ..., crc32: _Optional[int] = ...) -> None: ...

class Reply(_message.Message):
    __slots__ = ("accepted", "reason", "detail")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    reason: Reason
    detail: str
    def __init__(self, accepted: _Optional[bool] = ..., reason: _Optional[_Union[Reason, str]] = ..., detail: _Optional[str] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("header", "chunk", "trailer", "reply")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    TRAILER_FIELD_NUMBER: _ClassVar[int]
    REPLY_FIELD_NUMBER: _ClassVar[int]
    header: Header
    chunk: Chunk
    trailer: Trailer
    reply: Reply
    def __init__(self, header: _Optional[_Union[Header, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ..., trailer: _Optional[_Union[Trailer, _Mapping]] = ..., reply: _Optional[_Union[Reply, _Mapping]] = ...) -> None: ...

class FetchStateRequest(_message.Message):
    __slots__ = ("protocol_version", "run_id", "requester_id")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    REQUESTER_ID_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    run_id: str
    requester_id: str
    def __init__(self, protocol_version: _Optional[int] = ..., run_id: _Optional[str] = ..., requester_id: _Optional[str] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("peer_id", "run_id", "outer_step", "strategy", "version", "num_peers", "bytes_sent", "bytes_received", "model_fingerprint", "problems", "val_loss")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    OUTER_STEP_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_PEERS_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    PROBLEMS_FIELD_NUMBER: _ClassVar[int]
    VAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    run_id: str
    outer_step: int
    strategy: str
    version: str
    num_peers: int
    bytes_sent: int
    bytes_received: int
    model_fingerprint: str
    problems: _containers.RepeatedScalarFieldContainer[str]
    val_loss: float
    def __init__(self, peer_id: _Optional[str] = ..., run_id: _Optional[str] = ..., outer_step: _Optional[int] = ..., strategy: _Optional[str] = ..., version: _Optional[str] = ..., num_peers: _Optional[int] = ..., bytes_sent: _Optional[int] = ..., bytes_received: _Optional[int] = ..., model_fingerprint: _Optional[str] = ..., problems: _Optional[_Iterable[str]] = ..., val_loss: _Optional[float] = ...) -> None: ...

class StreamOpen(_message.Message):
    __slots__ = ("method", "metadata", "timeout_s")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    METHOD_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    method: str
    metadata: _containers.ScalarMap[str, str]
    timeout_s: float
    def __init__(self, method: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class StreamEnd(_message.Message):
    __slots__ = ("ok", "reason", "detail")
    OK_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    reason: Reason
    detail: str
    def __init__(self, ok: _Optional[bool] = ..., reason: _Optional[_Union[Reason, str]] = ..., detail: _Optional[str] = ...) -> None: ...
