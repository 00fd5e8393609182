"""Validation of request bodies into plain records; every problem is a 422 that
names the field. Unknown chat parameters pass through to the upstream untouched."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from .accounting import arguments_chars
from .config import MAX_LABEL
from .errors import ApiError
from .json_codec import dumps
from .records import IMPLICIT_JOB_TYPE, is_implicit

ROLES = ("system", "user", "assistant", "tool", "function", "developer")
# The content part types LiteLLM takes in a user message (its ValidUserMessageContentTypes). It
# answers any other with a 500 of its own, which the gateway cannot tell from a model failing: the
# call was tried on every model of its group and came back a 503 that clients retry.
USER_PART_TYPES = (
    "text", "image_url", "input_audio", "audio_url", "document", "guarded_text", "grounding_source", "query",
    "video_url", "file",
)
MAX_MESSAGES = 10_000
MAX_STOP_SEQUENCES = 16
MAX_STOP_LENGTH = 1_000
MAX_TOKENS = 10_000_000  # far above any model's output, far below what would overflow a counter

# Tollgate's own keys, never forwarded upstream.
CALL_KEYS = ("model_group", "purpose")


def invalid(field: str, problem: str) -> ApiError:
    return ApiError(422, f"{field}: {problem}", code="invalid_value", param=field)


def _is_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return isinstance(value, int) or math.isfinite(value)  # ints may exceed a float's range


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def optional_str(body: dict[str, Any], field: str, max_length: int = MAX_LABEL, allow_empty: bool = False) -> str | None:
    value = body.get(field)
    if value is None:
        return None
    if not isinstance(value, str):
        raise invalid(field, "must be a string")
    if not value and not allow_empty:
        raise invalid(field, "must not be empty")
    if len(value) > max_length:
        raise invalid(field, f"must be at most {max_length} characters")
    return value


def required_str(body: dict[str, Any], field: str, max_length: int = MAX_LABEL) -> str:
    value = optional_str(body, field, max_length)
    if value is None:
        raise invalid(field, "is required")
    return value


def optional_object(body: dict[str, Any], field: str) -> dict[str, Any] | None:
    value = body.get(field)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise invalid(field, "must be an object")
    return value


def optional_int(body: dict[str, Any], field: str, minimum: int | None = None, maximum: int | None = None) -> int | None:
    value = body.get(field)
    if value is None:
        return None
    if not _is_int(value):
        raise invalid(field, "must be an integer")
    if minimum is not None and value < minimum:
        raise invalid(field, f"must be at least {minimum}")
    if maximum is not None and value > maximum:
        raise invalid(field, f"must be at most {maximum}")
    return value


def _number_in(body: dict[str, Any], field: str, low: float, high: float) -> None:
    value = body.get(field)
    if value is None:
        return
    if not _is_number(value):
        raise invalid(field, "must be a number")
    if not low <= value <= high:
        raise invalid(field, f"must be between {low:g} and {high:g}")


@dataclass(slots=True)  # not frozen: made for every call, see README's "Per-call records"
class CallRequest:
    """A validated chat call: Tollgate's own fields apart, the rest to forward."""

    model_group: str | None
    purpose: str | None
    params: dict[str, Any]
    stream: bool
    client_wants_usage: bool
    prompt_chars: int
    max_tokens: int | None

    @property
    def prompt_estimate(self) -> int:
        return math.ceil(self.prompt_chars / 4)


def parse_call(body: dict[str, Any], *, openai: bool) -> CallRequest:
    """Validate a call body. On /api the route decides streaming; on /v1 the body does."""
    model_group: str | None
    if openai:
        model_group = required_str(body, "model", 128)
    else:
        model_group = optional_str(body, "model_group", 128) or optional_str(body, "model", 128)
    purpose = optional_str(body, "purpose")
    prompt_chars = _check_messages(body.get("messages"))
    max_tokens = max_completion_tokens = None
    if not _CHECKED.isdisjoint(body):  # most calls send none of them: nothing more to check
        max_tokens, max_completion_tokens = _check_parameters(body)
    if not _LITELLM_CONTROLS.isdisjoint(body):
        field = min(_LITELLM_CONTROLS.intersection(body))
        raise invalid(field, "is LiteLLM's own and not accepted through the gateway: what it controls is the operator's")
    if "extra_body" in body:
        _check_extra_body(body["extra_body"])

    stream = False
    client_wants_usage = False
    if openai:
        stream = body.get("stream", False)
        if stream is None:
            stream = False
        if not isinstance(stream, bool):
            raise invalid("stream", "must be true or false")
        options = body.get("stream_options") or {}
        include_usage = options.get("include_usage", False)
        if include_usage is not None and not isinstance(include_usage, bool):
            raise invalid("stream_options.include_usage", "must be true or false")
        client_wants_usage = bool(include_usage)

    dropped = _DROPPED_OPENAI if openai else _DROPPED_JOBS
    params = {key: value for key, value in body.items() if key not in dropped}
    # Both may be sent, and the upstream may honour either: the rate limits count the larger.
    completion_limit = max(max_tokens or 0, max_completion_tokens or 0) or None
    return CallRequest(model_group, purpose, params, stream, client_wants_usage, prompt_chars, completion_limit)


# The keys of a call body not forwarded as they are: Tollgate's own, and the streaming ones, which
# the gateway sets itself. On /api `model` names the group (as `model_group`) and `stream_options`
# is the gateway's; on /v1 `model` is forwarded, and so are a stream's own options beside the
# usage the gateway asks for (calls.py), as LiteLLM passes them on: `include_obfuscation`.
_DROPPED_OPENAI = frozenset([*CALL_KEYS, "stream"])
_DROPPED_JOBS = _DROPPED_OPENAI | {"model", "stream_options"}

# The chat parameters checked, in the order their problems are reported.
_NUMBERS = (("temperature", 0, 2), ("top_p", 0, 1), ("frequency_penalty", -2, 2), ("presence_penalty", -2, 2))
_INTEGERS = (("n", 1, 128), ("seed", -(2**63), 2**63 - 1), ("top_logprobs", 0, 20))
_OBJECTS = ("response_format", "metadata", "logit_bias", "stream_options")
Check = Callable[[dict[str, Any], str], None]  # raises the parameter's 422, given the body and its name


def _numbers(low: float, high: float) -> Check:
    return lambda body, field: _number_in(body, field, low, high)


def _integers(low: int, high: int) -> Check:
    def check(body: dict[str, Any], field: str) -> None:
        optional_int(body, field, minimum=low, maximum=high)
    return check


def _user(body: dict[str, Any], field: str) -> None:
    optional_str(body, field, allow_empty=True)


def _object(body: dict[str, Any], field: str) -> None:
    optional_object(body, field)


def _web_search_options(body: dict[str, Any], field: str) -> None:
    # LiteLLM reads the options as a mapping whenever the key is there (its cost tracking, before
    # any model is asked): a null failed with a 500 of its own, which the gateway cannot tell from
    # a model failing, so every model of the group was tried and the client got a 503 to retry.
    if not isinstance(body[field], dict):
        raise invalid(field, "must be an object (leave it out for none)")


def _tools(body: dict[str, Any], field: str) -> None:
    tools = body[field]
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
        raise invalid(field, "must be a list of objects")
    for i, tool in enumerate(tools or ()):
        # LiteLLM runs the tools of the MCP servers it serves that an `mcp` tool names, for any
        # caller (Tollgate's key may use every server), then asks the model again with their answers.
        if tool.get("type") == "mcp":
            raise invalid(
                f"{field}[{i}].type", "'mcp' tools are LiteLLM's MCP servers, which are not called through the gateway"
            )
        # LiteLLM searches the vector stores a tool names (a file_search tool) for any caller, as
        # it does the body's vector_store_ids: another team's documents in this call's prompt.
        if "vector_store_ids" in tool:
            raise invalid(
                f"{field}[{i}].vector_store_ids",
                "names LiteLLM's vector stores, which are not searched through the gateway",
            )


def _guardrail_names(value: Any, field: str) -> None:
    # A guardrail of the operator's that a call asks for by name only adds checks. An object
    # naming one carries `extra_body`, which LiteLLM (Enterprise) sends that guardrail's API over
    # the operator's own settings: its thresholds or policy changed for the team's calls.
    if value is None:
        return
    if not isinstance(value, list):
        raise invalid(field, "must be a list of guardrail names")
    for i, name in enumerate(value):
        if not isinstance(name, str):
            raise invalid(f"{field}[{i}]", "must be a guardrail's name: its settings are the operator's")


def _guardrails(body: dict[str, Any], field: str) -> None:
    _guardrail_names(body[field], field)


def _metadata(body: dict[str, Any], field: str) -> None:
    metadata = optional_object(body, field)
    if metadata is None:
        return
    if "guardrails" in metadata:  # LiteLLM reads them there as well
        _guardrail_names(metadata["guardrails"], f"{field}.guardrails")
    if "redis_namespace" in metadata:  # as it reads a cache's namespace (below)
        raise invalid(f"{field}.redis_namespace", _CACHE_NAMESPACE)
    _logging_controls(metadata, field)


# The keys of a call's metadata that LiteLLM's logging integrations take as their own settings, not
# as labels of the call. Every team's calls reach LiteLLM with Tollgate's one key and are logged
# into the operator's Langfuse, LangSmith, Datadog... projects, where these would let a team write
# into another team's records, hide its calls from the operator, or log them elsewhere.
_RECORD_ID = ("names a record of the operator's logging (a trace, run, span or generation, maybe another team's) "
              "that LiteLLM writes the call into or under: not chosen through the gateway")
_LOGGING_REFUSED: dict[str, str] = {
    # Langfuse's trace id (LangSmith's and Datadog's as well): a trace of that id, another team's,
    # was overwritten with the call's name, prompt and answer.
    "trace_id": _RECORD_ID,
    # LiteLLM takes it for the call's trace id, as trace_id, and LangSmith for the id of the project
    # (its tracer session) the run is written to; LangSmith refuses a whole batch, every team's runs
    # in it, over one that is not a project of its.
    "session_id": "is taken by LiteLLM for the call's trace id (and LangSmith's project): not chosen through "
                  "the gateway; label a session with trace_session_id",
    # Langfuse: the call added to an existing trace, whose input and output it may replace (with the
    # operator's langfuse_enable_update_trace_keys, the fields update_trace_keys names); the call's
    # generation written over another of that id (model, usage, cost, content), or nested under
    # another observation.
    **dict.fromkeys(("existing_trace_id", "update_trace_keys", "generation_id", "parent_observation_id"), _RECORD_ID),
    # LangSmith's run, its parent and place in a trace (`id` is read as the run's id); Lunary's and
    # PostHog's parent run; Datadog LLM Observability's span and parent span; Braintrust's spans;
    # Literal AI's step, thread, parent and root run.
    **dict.fromkeys(("id", "run_id", "parent_run_id", "dotted_order", "parent_id", "span_id", "root_span_id",
                     "span_parents", "step_id", "literalai_thread_id", "literalai_parent_id", "literalai_root_run_id"),
                    _RECORD_ID),
    # The call's prompt and answer logged to Langfuse as "redacted-by-litellm".
    **dict.fromkeys(("mask_input", "mask_output"),
                    "is the operator's: it keeps the call's prompt or answer out of LiteLLM's logging"),
    # As at the top level (refused there): at 0 the call is left out of LangSmith.
    "langsmith_sampling_rate": "is the operator's: the share of calls LiteLLM's LangSmith logging records",
    # LiteLLM's Langfuse logging links the call's generation to the Langfuse prompt it describes,
    # one of the operator's; anything else (a string naming it, say) dropped the generation (its
    # model, usage and cost) from Langfuse.
    "prompt": "is read by LiteLLM's Langfuse logging as a prompt of the operator's Langfuse, and anything else "
              "drops the call's record there: not accepted through the gateway",
    # LiteLLM's raw metadata of the call (its key's hash, its own address...) written into the
    # Langfuse trace, past the redaction the operator may have set (redact_user_api_key_info).
    "debug_langfuse": "is the operator's: it writes LiteLLM's own metadata of the call into its Langfuse trace",
    # The LangSmith or Braintrust project the call is logged to, over the operator's.
    **dict.fromkeys(("project_name", "project_id"),
                    "is the operator's: the project LiteLLM's logging writes the call to"),
}
# Langfuse makes each `trace_<field>` key a field of the call's trace: these label it, every other
# one is refused, for what it does (trace_id above; trace_input and trace_output replace the logged
# prompt and answer, trace_timestamp backdates the trace out of view, trace_public publishes it,
# trace_environment moves it out of the operator's environment) or will do in a later Langfuse.
_TRACE_FIELD = "is a field of the call's Langfuse trace that only the operator's logging sets"
_TRACE_LABELS = frozenset([
    "trace_name", "trace_user_id", "trace_session_id", "trace_version", "trace_release", "trace_metadata", "trace_tags",
])
# Labels Langfuse takes as strings: an object or a list made it drop the call's trace or generation
# (both, for `version`), so the operator's logging had no record of it.
_LANGFUSE_STRING_LABELS = ("generation_name", "trace_name", "trace_user_id", "trace_session_id", "trace_version",
                           "trace_release", "version")
# Opik's settings of the call, read from metadata.opik: its project and the trace and span it is
# logged under are the operator's; its tags and thread label it.
_OPIK_REFUSED = {
    "project_name": _LOGGING_REFUSED["project_name"],
    "current_span_data": _RECORD_ID,
}


# LiteLLM's Helicone logging sends the call's whole metadata as the Helicone headers of its log
# (`meta`, over its own Helicone-Auth): Helicone-Omit-Request / -Response keep the prompt or answer
# out of the operator's Helicone, Helicone-Auth names the account it is logged to. Its labels (a
# property, the user, a session) describe the call's own record.
_HELICONE = "helicone-"
_HELICONE_LABELS = ("helicone-property-", "helicone-user-id", "helicone-session-")
_HELICONE_REFUSED = "is a Helicone header of the operator's logging, not a label: not accepted through the gateway"


def _logging_refusal(key: str) -> str | None:
    """Why a key of a call's metadata is refused as a setting of the operator's logging, if it is."""
    if key in _LOGGING_REFUSED:
        return _LOGGING_REFUSED[key]
    if key.startswith("trace_") and key not in _TRACE_LABELS:
        return _TRACE_FIELD
    lowered = key.lower()
    if lowered.startswith(_HELICONE) and not lowered.startswith(_HELICONE_LABELS):
        return _HELICONE_REFUSED
    return None


def _logging_controls(metadata: dict[str, Any], field: str) -> None:
    refused = {key: reason for key in metadata if (reason := _logging_refusal(key)) is not None}
    if refused:
        key = min(refused)
        raise invalid(f"{field}.{key}", refused[key])
    for key in _LANGFUSE_STRING_LABELS:
        if isinstance(metadata.get(key), (dict, list)):
            raise invalid(f"{field}.{key}", "must be a string: Langfuse drops the record of a call labelled otherwise")
    opik = metadata.get("opik")
    if opik is not None and not isinstance(opik, dict):
        raise invalid(f"{field}.opik", "must be an object")
    _refuse_keys(opik, _OPIK_REFUSED, f"{field}.opik")


def _refuse_keys(value: dict[str, Any] | None, refusals: dict[str, str], field: str) -> None:
    """A 422 naming the first key of `value` (an object, or None) that `refusals` refuses, with why."""
    refused = sorted(refusals.keys() & (value or {}).keys())
    if refused:
        raise invalid(f"{field}.{refused[0]}", refusals[refused[0]])


# LiteLLM's cache keeps the answers of every team under the operator's namespace and for the
# operator's time: a body's own, which LiteLLM takes over them, are refused. A call may still
# keep its own answer out of the cache (no-cache, no-store) or take only a recent one (s-maxage).
_CACHE_NAMESPACE = "is the operator's: the namespace of LiteLLM's cache is not chosen through the gateway"
_CACHE_REFUSED = {
    "namespace": _CACHE_NAMESPACE,
    "ttl": "is the operator's: how long LiteLLM's cache keeps an answer, which every team may be served",
}


def _cache_controls(body: dict[str, Any], field: str) -> None:
    _refuse_keys(optional_object(body, field), _CACHE_REFUSED, field)


def _short_string(body: dict[str, Any], field: str) -> None:
    optional_str(body, field, 1_000, allow_empty=True)


def _prompt_version(body: dict[str, Any], field: str) -> None:
    version = body[field]
    if version is not None and not (_is_int(version) or isinstance(version, str)):
        raise invalid(field, "must be an integer or a string")


def _strings(body: dict[str, Any], field: str) -> None:
    value = body[field]
    if value is not None and (not isinstance(value, list) or not all(isinstance(item, str) for item in value)):
        raise invalid(field, "must be a list of strings")


def _boolean(body: dict[str, Any], field: str) -> None:
    value = body[field]
    if value is not None and not isinstance(value, bool):
        raise invalid(field, "must be true or false")


# Each checked chat parameter's check, in the order their problems are reported: made once, at import.
_CHAT_CHECKS: dict[str, Check] = {
    **{field: _numbers(low, high) for field, low, high in _NUMBERS},
    "max_tokens": _integers(1, MAX_TOKENS),
    "max_completion_tokens": _integers(1, MAX_TOKENS),
    **{field: _integers(low, high) for field, low, high in _INTEGERS},
    "user": _user,
    "stop": lambda body, field: _check_stop(body[field]),
    **{field: _metadata if field == "metadata" else _object for field in _OBJECTS},
    "web_search_options": _web_search_options,
    "tools": _tools,
    "tool_choice": lambda body, field: _check_tool_choice(body[field]),
}
# LiteLLM's own request parameters that a client may send, of the type LiteLLM reads them as. One
# of another type failed inside LiteLLM with a 500 of its own (prompt_id: 5 in its prompt
# registry), which the gateway cannot tell from a model failing: the call was tried on every
# model of its group and came back a 503 that clients retry. Reported after the chat parameters.
_LITELLM_CHECKS: dict[str, Check] = {
    **{field: _short_string for field in ("prompt_id", "prompt_label", "prompt_environment")},
    "prompt_variables": _object,
    "prompt_version": _prompt_version,
    **{field: _strings for field in ("tags", "additional_drop_params", "allowed_openai_params")},
    "guardrails": _guardrails,
    # A stream's option, read into LiteLLM's GenericLiteLLMParams (a boolean) for streams alone:
    # another value failed every streamed call with a 500 of LiteLLM's, a plain call not at all.
    "merge_reasoning_content_in_choices": _boolean,
    "cache": _cache_controls,
}
_CHECKS = {**_CHAT_CHECKS, **_LITELLM_CHECKS}
_ORDER = {field: i for i, field in enumerate(_CHECKS)}
_CHECKED = frozenset(_CHECKS)
# The chat parameters checked, which extra_body may not carry either.
_PARAMETERS = frozenset(_CHAT_CHECKS)


# LiteLLM's own request parameters, which it honours from any caller: other models to fall back
# to (outside the team's group), retries and timeouts, canned answers, prices, and where to
# send the request. Passed on, they would let a call reach models its team was not granted, or
# make its records (model, cost) wrong.
_LITELLM_CONTROLS = frozenset([
    "fallbacks", "context_window_fallbacks", "content_policy_fallbacks", "model_list", "num_retries",
    "max_retries", "timeout", "request_timeout", "stream_timeout", "mock_response", "mock_tool_calls",
    "mock_timeout", "mock_delay", "mock_testing_fallbacks", "mock_testing_context_fallbacks",
    "mock_testing_content_policy_fallbacks", "mock_testing_rate_limit_error", "api_key", "api_base",
    "base_url", "api_version", "custom_llm_provider", "deployment_id", "input_cost_per_token",
    "output_cost_per_token", "input_cost_per_second", "output_cost_per_second", "litellm_metadata",
    "litellm_call_id", "litellm_trace_id", "litellm_session_id", "litellm_logging_obj", "proxy_server_request",
    "model_info", "user_api_key", "secret_fields",
    # Router settings LiteLLM's route_request takes from the body for one request: fallbacks to
    # any model it serves, retries of each failure.
    "router_settings_override", "model_group_retry_policy",
    # HTTP headers LiteLLM sends the provider: the deployment's credentials replaced, or an
    # OpenAI-Organization / OpenAI-Project choosing which of the operator's accounts pays.
    "extra_headers", "headers",
    # Sent to the provider as OpenAI-Organization (the SDKs send it as a header, which the
    # gateway does not pass on, never in the body).
    "organization",
    # The credentials, identities and endpoints LiteLLM bans from a body by name (the literal
    # names of _BANNED_REQUEST_BODY_PARAMS, checked by auth_utils.is_request_body_safe; api_base,
    # base_url and model_list are above). LiteLLM's refusal hides its reason behind a bare 500
    # when it runs without prisma, as Tollgate installs it: named here, the client learns which.
    # The observability and pricing fields it derives into that list, and whatever a later
    # LiteLLM adds, are refused by LiteLLM and answered as its refusal (see forwarding.py).
    "user_config", "aws_sts_endpoint", "aws_web_identity_token", "aws_role_name", "aws_profile_name",
    "aws_session_name", "aws_external_id", "aws_session_tags", "vertex_credentials", "vertex_ai_credentials",
    "azure_ad_token", "aws_bedrock_runtime_endpoint", "aws_bedrock_project_id", "bedrock_tags",
    "s3_endpoint_url", "sagemaker_base_url", "deployment_url", "nvcf_function_id", "use_ssl", "rust",
    # A deployment's provider settings, which LiteLLM lets a body override for one call (its router
    # puts the body's fields over the deployment's litellm_params): the account, project, region,
    # endpoint and credentials a call goes to, some of which the list above leaves out. They are
    # LiteLLM's CredentialLiteLLMParams, the provider keys completion() reads from its kwargs
    # (get_litellm_params.OPTIONAL_KWARGS_KEYS) and the fields it drops when a caller redirects
    # api_base (clientside_credential_handler), each checked against its source by the tests.
    "vertex_project", "vertex_location", "vertex_ai_project", "vertex_ai_location", "region_name",
    "gcs_bucket_name", "bucket_name", "aws_access_key_id", "aws_secret_access_key", "aws_session_token",
    "aws_region_name", "aws_batch_role_arn", "s3_bucket_name", "s3_region_name", "s3_encryption_key_id",
    "s3_output_bucket_name", "watsonx_region_name", "wx_credentials", "watsonx_credentials", "tenant_id",
    "client_id", "client_secret", "azure_username", "azure_password", "azure_scope", "azure_ad_token_provider",
    "api_type", "default_headers", "gigachat_scope", "gigachat_auth_url", "gigachat_access_token", "oci_signer",
    "oci_user", "oci_fingerprint", "oci_tenancy", "oci_key", "oci_key_file", "predibase_tenant_id",
    "litellm_credential_name",  # one of the credentials stored in LiteLLM, by name
    "azure",  # true: the deployment's requests are sent as Azure's
    "use_litellm_proxy",  # the call sent to the LiteLLM proxy named in LiteLLM's environment
    "ssl_verify",  # the provider's TLS certificate left unchecked, or checked against a file of the body's choice
    "provider_specific_header",  # more HTTP headers LiteLLM sends the provider, as extra_headers
    "tpm", "rpm", "itpm", "otpm", "use_xai_oauth",  # the deployment's limits and xAI sign-in
    "base_model",  # the model LiteLLM prices the call as
    # How long LiteLLM's router takes a deployment out of every caller's rotation once the call
    # fails it (a 429, a timeout): the body's over the router's own, for as long as it says.
    "cooldown_time",
    # LiteLLM's internal arguments, never a client's. It failed on them with a 500 (original_function,
    # whatever its value) or a 429 "No deployments available" (_target_order, specific_deployment),
    # which the gateway took for the model failing and tried on the next; `client` with a 400.
    "client", "original_function", "specific_deployment", "_target_order",
    "self",  # passed on as the body's other fields are, it is a second `self` to LiteLLM's router: a 500
    "complete_response",  # LiteLLM's own, to build a stream's chunks into one answer: a streamed call's 500
    # Where LiteLLM's response cache reads and writes the call's answer, used as it is given: with
    # caching on, a team read any answer cached under a key it named, and stored its own answer
    # under another team's key, which that team was then served for its own question.
    "cache_key",
    # The same, by the name LiteLLM's cache reads it under: its own litellm_params, which it takes
    # from a body as they are (their preset_cache_key read first), and the field it fills them from.
    "litellm_params", "preset_cache_key",
    # The operator's logging callbacks (all but LiteLLM's own spend tracking) skipped for the call.
    "no-log",
    # ... or more of them run for it: LiteLLM's integrations by name ("s3", "langfuse"), logging
    # the call's prompt and answer with whatever credentials the operator's environment holds.
    "success_callback", "failure_callback",
    # The call's whole request and the provider's raw answer written to LiteLLM's log at WARNING,
    # whatever level the operator set it to.
    "litellm_request_debug",
    # How long LiteLLM's cache keeps the call's answer, which every team asking the same is served,
    # where the operator set no TTL of the cache's own (cache.ttl is refused above, over one).
    "ttl",
    # The share of calls LiteLLM's LangSmith logging records, the body's over the operator's: at 0,
    # the call is left out of it.
    "langsmith_sampling_rate",
    # How LiteLLM's router picks among a model's deployments, the body's over the operator's: the
    # deployments' weights set aside, calls spread onto the ones kept for overflow.
    "routing_strategy",
    # The call's place in LiteLLM's request queue (lower first): ahead of every other team's calls
    # when the deployments are busy. The operator sets the queue's order (router default_priority).
    "priority",
    # LiteLLM's vector stores searched for the call and their documents put into its prompt: any
    # store registered in LiteLLM, Tollgate's key being allowed them all (so too in a tool, below).
    "vector_store_ids",
])

# What `extra_body` may not carry: LiteLLM merges it into the provider's request after routing,
# so its `model` replaced the group's model there (a team reached any model the deployment's
# key can call, priced as the group's), and the fields Tollgate checks or counts on would be
# overridden behind its back.
_EXTRA_BODY_REFUSED = _LITELLM_CONTROLS | _PARAMETERS | {"model", "messages", "stream", "stream_options", "extra_body"}


def _check_extra_body(extra: Any) -> None:
    if extra is None:
        return
    if not isinstance(extra, dict):
        raise invalid("extra_body", "must be an object")
    if not _EXTRA_BODY_REFUSED.isdisjoint(extra):
        field = min(_EXTRA_BODY_REFUSED.intersection(extra))
        raise invalid(f"extra_body.{field}", "is not accepted inside extra_body: send chat parameters at the top level")


def _check_parameters(body: dict[str, Any]) -> tuple[int | None, int | None]:
    """The chat parameters of `body` that Tollgate checks; its max_tokens and max_completion_tokens.
    Only those the body has are looked at (a call sends one or two of the twenty), in the order
    of `_CHECKS`, so that of several problems the same one is reported whichever order they came in."""
    present = _CHECKED.intersection(body)
    for field in sorted(present, key=_ORDER.__getitem__) if len(present) > 1 else present:
        _CHECKS[field](body, field)
    return body.get("max_tokens"), body.get("max_completion_tokens")  # checked above, if sent


# The OpenAI SDK's other tool choices (ChatCompletionAllowedToolChoiceParam and
# ChatCompletionNamedToolChoiceCustomParam), well-formed, which LiteLLM 1.102.4 fails on all the same.
_UNSERVED_TOOL_CHOICES = ("allowed_tools", "custom")


def _check_tool_choice(tool_choice: Any) -> None:
    # As LiteLLM reads an object (validate_chat_completion_tool_choice): what it refuses, it
    # refuses with a 500, which would be tried on every model of the group.
    if tool_choice is None or isinstance(tool_choice, str):
        return
    if not isinstance(tool_choice, dict):
        raise invalid("tool_choice", "must be a string or an object")
    kind = tool_choice.get("type")
    if kind in ("auto", "none", "required") and "function" not in tool_choice:
        return
    if kind in _UNSERVED_TOOL_CHOICES and tool_choice.get("function") is None:
        # Told as what it is: an SDK's user read "must have a 'function' object" as a mistake of its own.
        raise invalid(
            "tool_choice",
            f"of type '{kind}' is not served through the gateway (LiteLLM, behind it, fails on it): use "
            "'auto', 'none', 'required' or {'type': 'function', 'function': {'name': ...}}",
        )
    if not isinstance(kind, str) or not isinstance(tool_choice.get("function"), dict):
        raise invalid(
            "tool_choice",
            "an object must have a 'type' and, unless that is 'auto', 'none' or 'required', a 'function' object",
        )


def _check_messages(messages: Any) -> int:
    if messages is None:
        raise invalid("messages", "is required")
    if not isinstance(messages, list):
        raise invalid("messages", "must be a list of message objects")
    if not messages:
        raise invalid("messages", "must not be empty")
    if len(messages) > MAX_MESSAGES:
        raise invalid("messages", f"must hold at most {MAX_MESSAGES} messages")
    chars = 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise invalid(f"messages[{i}]", "must be an object with 'role' and 'content'")
        role = message.get("role")
        if not isinstance(role, str):
            raise invalid(f"messages[{i}].role", "is required and must be a string")
        if role not in ROLES:
            raise invalid(f"messages[{i}].role", "must be one of: " + ", ".join(ROLES))
        content = message.get("content")
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            for j, part in enumerate(content):
                if not isinstance(part, dict):
                    raise invalid(f"messages[{i}].content[{j}]", "must be an object")
                kind = part.get("type")
                if not isinstance(kind, str):
                    raise invalid(f"messages[{i}].content[{j}].type", "is required and must be a string")
                if role == "user" and kind not in USER_PART_TYPES:
                    raise invalid(f"messages[{i}].content[{j}].type", "must be one of: " + ", ".join(USER_PART_TYPES))
                if kind == "image_url" and part.get("image_url") is None:
                    raise invalid(f"messages[{i}].content[{j}].image_url", "is required in an 'image_url' part")
                text = part.get("text")
                if isinstance(text, str):
                    chars += len(text)
                elif kind == "text":  # refused upstream, with its prompt left out of the estimate
                    raise invalid(
                        f"messages[{i}].content[{j}].text", "is required in a 'text' part and must be a string"
                    )
        elif content is None:
            if role in ("system", "user", "developer"):
                raise invalid(f"messages[{i}].content", "is required for this role")
        else:
            raise invalid(f"messages[{i}].content", "must be a string, a list of parts, or null")
        tool_calls = message.get("tool_calls")
        if tool_calls is not None:
            if not isinstance(tool_calls, list):
                raise invalid(f"messages[{i}].tool_calls", "must be a list of objects")
            # A tool round trip sends the model's calls back: their arguments are prompt text, as
            # they were completion text in the answer that made them (accounting.completion_chars).
            for call in tool_calls:
                if not isinstance(call, dict):
                    raise invalid(f"messages[{i}].tool_calls", "must be a list of objects")
                chars += arguments_chars(call.get("function"))
        if role == "assistant":
            chars += arguments_chars(message.get("function_call"))  # the legacy functions API's
    return chars


def _check_stop(stop: Any) -> None:
    if stop is None:
        return
    sequences = [stop] if isinstance(stop, str) else stop
    if not isinstance(sequences, list) or not all(isinstance(s, str) for s in sequences):
        raise invalid("stop", "must be a string or a list of strings")
    if len(sequences) > MAX_STOP_SEQUENCES:
        raise invalid("stop", f"must hold at most {MAX_STOP_SEQUENCES} sequences")
    if any(len(s) > MAX_STOP_LENGTH for s in sequences):
        raise invalid("stop", f"sequences must be at most {MAX_STOP_LENGTH} characters")


@dataclass(frozen=True)
class JobRequest:
    job_type: str
    team_id: str | None
    user_id: str | None
    metadata: dict[str, Any]


# A job's metadata is returned with it in every listing (up to 500 jobs a page): without a bound
# of its own, 10 MiB bodies made a page of hundreds of MB for anyone listing the team's jobs.
MAX_METADATA_BYTES = 64 * 1024


def _job_metadata(body: dict[str, Any]) -> dict[str, Any] | None:
    metadata = optional_object(body, "metadata")
    if metadata is not None and len(dumps(metadata)) > MAX_METADATA_BYTES:
        raise invalid("metadata", f"must be at most {MAX_METADATA_BYTES // 1024} KiB as JSON")
    return metadata


def parse_job_create(body: dict[str, Any]) -> JobRequest:
    job_type = required_str(body, "job_type")
    metadata = _job_metadata(body) or {}
    if is_implicit(job_type, metadata):
        # The mark of the job a /v1 call makes for itself, which takes no other call and which
        # only the gateway finishes: a client's own job so marked could never be completed.
        raise invalid("metadata", f"'implicit': true is reserved for the jobs Tollgate makes for /v1 calls "
                      f"(job_type '{IMPLICIT_JOB_TYPE}')")
    return JobRequest(
        job_type=job_type,
        team_id=optional_str(body, "team_id"),
        user_id=optional_str(body, "user_id"),
        metadata=metadata,
    )


@dataclass(frozen=True)
class CompleteRequest:
    status: str
    metadata: dict[str, Any] | None
    error_message: str | None


def parse_complete(body: dict[str, Any]) -> CompleteRequest:
    status = body.get("status")
    if status not in ("completed", "failed"):
        raise invalid("status", "must be 'completed' or 'failed'")
    return CompleteRequest(
        status=status,
        metadata=_job_metadata(body),
        error_message=optional_str(body, "error_message", 10_000, allow_empty=True),
    )


def parse_paging(query: Any, max_limit: int = 500) -> tuple[str | None, int, int]:
    """`?status=&limit=&offset=` of the job lists."""
    status = query.get("status") or None
    if status is not None and status not in ("pending", "in_progress", "completed", "failed"):
        raise invalid("status", "must be one of: pending, in_progress, completed, failed")
    return (status, *parse_page(query, max_limit))


def parse_page(query: Any, max_limit: int = 500) -> tuple[int, int]:
    """`?limit=&offset=` of a list."""
    return _query_int(query, "limit", 50, 1, max_limit), _query_int(query, "offset", 0, 0, 10**9)


def _query_int(query: Any, name: str, default: int, low: int, high: int) -> int:
    raw = query.get(name)
    if raw is None or raw == "":
        return default
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 12) or not low <= int(raw) <= high:
        raise invalid(name, f"must be an integer from {low} to {high}")
    return int(raw)
