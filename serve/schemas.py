"""The HTTP API's request and response schemas, its error shape, and the Ingress's settings.

Every rejected request gets ``{"error": {"message", "type", "param", "code"}}`` (``error_body``)
with a 4xx naming the field; ``ApiError`` carries one from anywhere in the request path.
"""

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from negatron.cluster.serve_config import BatchConfig, EncoderServe, LimitsConfig, RetrieverServe

class ApiError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None) -> dict:
    kind = {401: "authentication_error", 404: "not_found_error", 413: "request_too_large",
            503: "service_unavailable", 504: "timeout_error"}.get(status, "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# -- request / response schemas -------------------------------------------------------------------

class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    input: Union[str, list[str]] = Field(..., description="A text or a list of texts.")
    model: Optional[str] = Field(None, description="Served model name (GET /v1/models); default model if omitted.")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = Field(None, description="Must equal the model's dimension if given.")
    user: Optional[str] = None
    input_type: Optional[Literal["query", "document", "search_query", "search_document"]] = Field(None, description=(
        "Put the model's query or document prompt (model.query_prompt / model.document_prompt, saved with "
        "the checkpoint) in front of each text, as in training; omitted = the texts as given."))


class EmbeddingItem(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: Union[list[float], str]


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingItem]
    model: str
    usage: Usage


class RerankRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    query: str
    texts: list[str]
    top_n: Optional[int] = Field(None, ge=1, description="Return only the best N (default: all).")
    return_text: bool = False


class RerankResult(BaseModel):
    index: int
    score: float
    text: Optional[str] = None


class CohereRerankRequest(BaseModel):
    """Cohere's rerank request (``/v1/rerank`` and ``/v2/rerank``): what the ``cohere`` client sends.

    v1 documents may be objects: their ``text`` field is ranked, or with ``rank_fields`` those
    fields as ``name: value`` lines (Cohere's semi-structured form)."""

    model_config = ConfigDict(extra="ignore")  # newer client fields (e.g. relevant_spans) are not errors
    model: Optional[str] = Field(None, description="The served reranker's name or 'default'.")
    query: str
    documents: list[Union[str, dict[str, Any]]]
    top_n: Optional[int] = Field(None, ge=1, description="Return only the best N (default: all).")
    return_documents: bool = False
    rank_fields: Optional[list[str]] = None
    max_tokens_per_doc: Optional[int] = Field(None, ge=1, description="Truncate each document to N tokens first.")
    max_chunks_per_doc: Optional[int] = Field(None, ge=1, description="Accepted; documents are never chunked.")


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    query: str
    top_k: int = Field(10, ge=1)
    rerank: bool = False


class ImageEmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    input: Union[str, list[str]] = Field(..., description="A base64 PNG/JPEG image (or a data: URL), or a list of them.")
    model: Optional[str] = Field(None, description="Served image model name; the default model if omitted.")
    encoding_format: Literal["float", "base64"] = "float"


class SearchResult(BaseModel):
    doc_id: str
    score: float
    text: str
    retrieval_score: Optional[float] = Field(None, description="The bi-encoder score when reranked.")


class IngressSettings(BaseModel):
    """What ``serve.app`` hands the Ingress (built from the ``serve:`` section and the model
    folders); defaults are the config's own."""

    model_config = ConfigDict(extra="forbid")
    models: dict[str, str] = Field(..., description="Served model name -> folder.")
    default_model: str
    limits: LimitsConfig = LimitsConfig()
    max_length: int = Field(0, description="Encoder token limit (0 = each model's own).")
    model_max_lengths: dict[str, int] = Field(default_factory=dict, description="Each text model's token limit.")
    dims: dict[str, int] = Field(default_factory=dict)
    reranker_path: str = ""
    reranker_name: str = Field("", description="The reranker's served name (the Cohere routes' 'model').")
    reranker_max_length: int = 512
    rerank_depth: int = RetrieverServe.model_fields["rerank_depth"].default
    rerank_weight: float = 1.0
    api_key_env: str = ""
    colocate: bool = False
    batch: BatchConfig = EncoderServe.model_fields["batch"].default
    torch_threads: int = 1
    image_models: list[str] = Field(default_factory=list)
    prompts: dict[str, dict[str, str]] = Field(default_factory=dict, description="Text model -> {role: prompt}.")
    backend: dict[str, str] = Field(default_factory=lambda: {"backend": "torch", "quantize": "none"},
                                    description="serve.encoder.backend and quantize (colocated encoders).")
    image_shapes: dict[str, tuple[int, int]] = Field(default_factory=dict, description="Image model -> (size, channels).")
    request_timeout_s: float = 0.0
    encoder_slots: int = Field(1, ge=1, description="Calls kept in flight to a separate Encoder deployment.")
