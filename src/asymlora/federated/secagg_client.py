"""The client's side of SecAgg+ rounds (`asymlora.federated.secagg`): two ClientApp mods around Flower's
own ``secaggplus_mod``.

``client_app.app`` lists them in every run; a message that is not part of a SecAgg+ round (it carries no
``secaggplus_configs`` record) passes both untouched, so runs without ``secagg`` behave as before::

    transfer_mod → secaggplus_gate (Flower's secaggplus_mod) → secagg_fit_mod → clipping_mod → train

- `secaggplus_gate` hands a SecAgg+ message to Flower's ``secaggplus_mod``, which answers the key
  setup, key sharing and unmask stages itself and calls the inner app only in the stage that collects the
  masked vectors;
- `secagg_fit_mod` turns that stage's legacy FitIns into asymlora's train instruction, lets the ordinary
  train handler (and client-side DP clipping) run, and answers in the legacy FitRes layout the mod reads:
  the upload as x_k = U_k · c / β in the server's shapes (`secagg.secagg_vector`) and n_k (1 under DP)
  as the weight. The plaintext upload is dropped from the reply before Flower masks x_k.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from asymlora.federated.messages import (
    ARRAYS,
    CONFIG,
    K_STRATEGY,
    TRAIN,
    decode_secagg_fitins,
    decode_train_reply,
    encode_secagg_fitres,
    from_record,
)
from asymlora.federated.privacy import KEY_CLIPPING_NORM
from asymlora.federated.secagg import SecAggSettings, secagg_vector
from asymlora.federated.strategies import get_strategy

__all__ = ["is_secagg_message", "secagg_fit_mod", "secaggplus_gate"]


def is_secagg_message(msg: Message) -> bool:
    """A train message of a SecAgg+ round (it carries Flower's ``secaggplus_configs`` record)."""
    return (
        msg.metadata.message_type == TRAIN
        and msg.has_content()
        and RECORD_KEY_CONFIGS in msg.content.config_records
    )


def secaggplus_gate(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Flower's ``secaggplus_mod`` for SecAgg+ messages; every other message passes through."""
    if is_secagg_message(msg):
        return secaggplus_mod(msg, ctxt, call_next)
    return call_next(msg, ctxt)


def secagg_fit_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Answer the SecAgg+ stage that collects the masked vectors (module docstring). Raises RuntimeError
    when the train handler fails (Flower's mod then reports the error to the server) and ValueError when
    the upload cannot go into the sum (`secagg.secagg_vector`) or the weight exceeds ``max_weight``."""
    if not is_secagg_message(msg):
        return call_next(msg, ctxt)
    content, fit = decode_secagg_fitins(msg.content)
    msg.content = content
    out = call_next(msg, ctxt)
    if out.has_error():
        raise RuntimeError(f"training failed: {out.error.reason}")
    config = content.config_records[CONFIG]
    reply = decode_train_reply(out.content)
    weight = 1 if KEY_CLIPPING_NORM in config else reply.num_examples  # DP: equal weights
    if weight > fit.max_weight:
        raise ValueError(
            f"client {reply.client} has num_examples={weight} > secagg.max_weight={fit.max_weight:g}: SecAgg+ "
            "would clip its weighted values; raise secagg.max_weight to the largest client's num_examples"
        )
    settings = SecAggSettings(
        enabled=True,
        value_bound=fit.value_bound,
        clipping_range=fit.clipping_range,
        max_weight=fit.max_weight,
        quantization_range=fit.quantization_range,  # d_k's rounding, as Flower's mod computes it
    )
    aggregation = get_strategy(str(config[K_STRATEGY])).aggregation
    download = from_record(content.array_records[ARRAYS])
    upload = from_record(out.content.array_records[ARRAYS])
    vector, clipped = secagg_vector(aggregation, upload, download, settings, weight)
    encode_secagg_fitres(out.content, vector, weight, clipped)
    return out
