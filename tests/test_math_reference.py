"""Reference values computed by hand (in the comments) for the formulas a wrong sign, a wrong power or a
skipped step would break without any other test noticing: the balance loss, MALoRA's initialisation,
SVCCA and subspace similarity at intermediate values, the float32 gate of a bfloat16 layer, the
federated aggregations, and the shared seeded A of FFA-LoRA and Fed-ALoRA (reset) across clients and the
server. Inputs are small and integer-ish so every expected value can be checked with pencil and paper.
"""

from __future__ import annotations

import math

import peft
import pytest
import torch
from tests.conftest import make_char_tokenizer, make_tiny_llama
from torch import nn

import asymlora.methods.malora as malora_module
from asymlora import AsymLoraConfig, Role
from asymlora.analysis.metrics import cca_similarity, principal_angles, subspace_similarity
from asymlora.federated import (
    adapter_state,
    aggregate,
    client_round_start,
    client_upload,
    download_payload,
    get_strategy,
    init_server_state,
    role_map,
)
from asymlora.methods import get_method
from asymlora.methods.fedhet import B0_NAME, B1_NAME, B2_NAME
from asymlora.methods.malora import cropped_svd_init
from asymlora.routing import RoutingCall, RoutingState, balance_loss, routing
from asymlora.tuner.layer import Linear

# --- Switch-Transformer balance loss N · Σ_i f_i P_i ----------------------------------------------------------
# Four tokens, N = 3 experts (rows sum to 1):
#   t1 (0.7, 0.2, 0.1) top-1 = 0     t2 (0.6, 0.3, 0.1) top-1 = 0
#   t3 (0.5, 0.4, 0.1) top-1 = 0     t4 (0.2, 0.2, 0.6) top-1 = 2
# f = (3/4, 0, 1/4) (fraction of tokens whose top-1 is i)
# P = column means = (2.0/4, 1.1/4, 0.9/4) = (0.5, 0.275, 0.225)
# L = 3 · (0.75·0.5 + 0·0.275 + 0.25·0.225) = 3 · 0.43125 = 1.29375
# (wrong forms: N·Σ P_i² = 3 · (0.25 + 0.075625 + 0.050625) = 1.12875; N·Σ f_i² = 1.875; constant 1.)
PROBS = torch.tensor(
    [[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.5, 0.4, 0.1], [0.2, 0.2, 0.6]], dtype=torch.float64
)
BALANCE = 1.29375


def test_balance_loss_by_hand() -> None:
    torch.testing.assert_close(balance_loss(PROBS), torch.tensor(BALANCE, dtype=torch.float64))
    # the token axes are flattened: (batch 2, seq 2, N) is the same four tokens
    torch.testing.assert_close(balance_loss(PROBS.view(2, 2, 3)), torch.tensor(BALANCE, dtype=torch.float64))
    # perfectly balanced: f = P = 1/N gives exactly 1; all mass on one expert gives N
    torch.testing.assert_close(balance_loss(torch.eye(3)), torch.tensor(1.0))
    torch.testing.assert_close(balance_loss(torch.tensor([[1.0, 0.0, 0.0]] * 5)), torch.tensor(3.0))


def _router_layer(router: str, weight: float) -> tuple[Linear, RoutingState]:
    """An ALoRA layer on a 4-input linear whose router turns one-hot token j into probability row j of PROBS.

    With x = e_j the logits are column j of W_g; W_g[:, j] = log PROBS[j] makes softmax(W_g e_j) = PROBS[j].
    """
    cfg = AsymLoraConfig(
        method="alora",
        router=router,
        r=1,
        num_experts=3,
        top_k=2,
        balance_loss_weight=weight,
        target_modules=["x"],
    )
    state = RoutingState()
    layer = Linear(nn.Linear(4, 2, bias=False, dtype=torch.float64), "default", cfg, state).double()
    with torch.no_grad():
        layer.asymlora_router["default"].copy_(PROBS.log().T)
    return layer, state


@pytest.mark.parametrize("router", ["soft", "topk"])
def test_balance_loss_collected_by_the_layer_is_the_hand_value(router: str) -> None:
    # The loss reads the full softmax before top-k, so top-2 of 3 gives the same 1.29375; weight 0.5 halves it.
    layer, state = _router_layer(router, weight=0.5)
    x = torch.eye(4, dtype=torch.float64).view(2, 2, 4)  # tokens e_1 … e_4 in a (batch 2, seq 2) layout
    with routing(state, RoutingCall(collect_aux=True)) as call:
        layer(x)
        (aux,) = call.aux_losses
    torch.testing.assert_close(aux, torch.tensor(0.5 * BALANCE, dtype=torch.float64))


# --- MALoRA: cropped SVD of the stacked K_i, S_A ∝ β, P_i ∝ 1/β ---------------------------------------------------
# N = 2 experts, r̂ = 2, d_in = 3, d_sub = 2, β = 2:
#   K_1 = [[4, 0, 0],      K_2 = [[0, 2, 0],      stack K (4 × 3) has orthogonal columns of norms 4, 2, 1,
#          [0, 0, 1]]             [0, 0, 0]]      so σ = (4, 2, 1), V = I (up to signs), V_d = (e1, e2).
#   P_i S_A = K_i V_d V_dᵀ (drop column 3):  P_1 S_A = [[4, 0, 0], [0, 0, 0]],  P_2 S_A = [[0, 2, 0], [0, 0, 0]].
#   The best rank-2 approximation of K_1 *alone* is K_1 itself ([[4,0,0],[0,0,1]]): a per-expert SVD fails.
#   S_A = β·V_dᵀ = ±[[2, 0, 0], [0, 2, 0]];  P = UΣ/β: |P_1| = [[4/2, 0], [0, 0]] = [[2, 0], [0, 0]],
#   |P_2| = [[0, 2/2], [0, 0]] = [[0, 1], [0, 0]]  (β multiplying P would give 8 and 4).
K_HAND = torch.tensor([[[4.0, 0, 0], [0, 0, 1]], [[0, 2.0, 0], [0, 0, 0]]])
PS_HAND = torch.tensor([[[4.0, 0, 0], [0, 0, 0]], [[0, 2.0, 0], [0, 0, 0]]])


def test_malora_cropped_svd_by_hand() -> None:
    s_a, p = cropped_svd_init(K_HAND, d_sub=2, beta=2.0)
    torch.testing.assert_close(torch.einsum("nrd,di->nri", p, s_a), PS_HAND)
    torch.testing.assert_close(s_a.abs(), torch.tensor([[2.0, 0, 0], [0, 2.0, 0]]))
    torch.testing.assert_close(p.abs(), torch.tensor([[[2.0, 0], [0, 0]], [[0, 1.0], [0, 0]]]))
    with pytest.raises(ValueError, match="subspace_rank=4"):
        cropped_svd_init(K_HAND, d_sub=4, beta=1.0)


def test_malora_init_uses_the_cropped_svd_of_its_kaiming_draw(monkeypatch) -> None:
    # init_ must decompose the K it drew: replace the draw by K_HAND and expect the hand values in the tensors
    monkeypatch.setattr(malora_module, "kaiming_", lambda t: t.copy_(K_HAND))
    cfg = AsymLoraConfig(method="malora", r=2, num_experts=2, beta=2.0, target_modules=["x"])
    t = {"S": torch.empty(2, 3), "A": torch.empty(2, 2, 2), "B": torch.ones(2, 5, 2)}
    get_method("malora").init_(t, cfg)
    torch.testing.assert_close(torch.einsum("nrd,di->nri", t["A"], t["S"]), PS_HAND)
    torch.testing.assert_close(t["S"] @ t["S"].T, 4.0 * torch.eye(2))  # β² I
    assert torch.equal(t["B"], torch.zeros(2, 5, 2))


def test_malora_init_is_block_of_best_approximation_of_the_stack_at_paper_shape() -> None:
    # N = 8, r = 8 -> d_sub = 32, r̂ = 12 (the paper); d_in = 64. Redraw the same K from the same seed.
    cfg = AsymLoraConfig(method="malora", r=8, num_experts=8, beta=1.25, target_modules=["x"])
    n, d_sub, r_hat, d_in = 8, cfg.malora_subspace_rank, cfg.malora_expert_rank, 64
    t = {"S": torch.empty(d_sub, d_in), "A": torch.empty(n, r_hat, d_sub), "B": torch.empty(n, 4, r_hat)}
    torch.manual_seed(3)
    get_method("malora").init_(t, cfg)
    torch.manual_seed(3)
    k = malora_module.kaiming_(torch.empty(n, r_hat, d_in)).double()
    _, _, vh = torch.linalg.svd(k.flatten(0, 1))
    proj = vh[:d_sub].T @ vh[:d_sub]  # V_d V_dᵀ
    got = torch.einsum("nrd,di->nri", t["A"].double(), t["S"].double())
    torch.testing.assert_close(got, k @ proj, rtol=1e-4, atol=1e-5)
    # the per-expert reading is far from it (relative error ≈ 0.4, as the review measured)
    assert float((got - k).norm() / k.norm()) > 0.3


# --- SVCCA and subspace similarity at intermediate values ----------------------------------------------------------
# Centred, mutually orthogonal datapoint patterns in R^4 (each sums to 0, so centring leaves them alone):
#   h1 = (1, 1, -1, -1),  h2 = (1, -1, 1, -1),  h3 = (1, -1, -1, 1).
# X's neurons span {h1, h2}; Y's span {h1, 0.6·h2 + 0.8·h3}. The principal angles between the spans have
# cosines ρ = (1, 0.6), so SVCCA = mean ρ = 0.8, while mean ρ² = (1 + 0.36)/2 = 0.68.
H1, H2, H3 = (torch.tensor(v, dtype=torch.float64) for v in ((1, 1, -1, -1), (1, -1, 1, -1), (1, -1, -1, 1)))


def test_svcca_is_the_mean_canonical_correlation() -> None:
    x = torch.stack([2 * H1, H1 + H2])  # an invertible mix of h1, h2 (CCA ignores it)
    y = torch.stack([H1, 3 * (0.6 * H2 + 0.8 * H3)])
    torch.testing.assert_close(cca_similarity(x, y, keep=2), torch.tensor(0.8, dtype=torch.float64))
    torch.testing.assert_close(cca_similarity(x, y, keep=1.0), torch.tensor(0.8, dtype=torch.float64))
    torch.testing.assert_close(
        cca_similarity(x.T, y.T, side="col", keep=2), torch.tensor(0.8, dtype=torch.float64)
    )
    # the same neurons shifted by a constant per neuron: centring removes the offset
    torch.testing.assert_close(
        cca_similarity(x + 5.0, y - 2.0, keep=2), torch.tensor(0.8, dtype=torch.float64)
    )


# Row spaces in R^4 with e1..e4 the unit vectors and u = 0.6·e2 + 0.8·e3:
#   X = [[3, 0, 0, 0], [0, 1, 0, 0]]: top-1 = e1, top-2 = {e1, e2}
#   Y = [[0, 1.2, 1.6, 0], [1, 0, 0, 0]]: rows orthogonal with norms 2 and 1, so top-1 = u, top-2 = {u, e1}
#   φ(2, 2) = (‖[e1 e2]ᵀ u‖² + ‖[e1 e2]ᵀ e1‖²) / 2 = (0.36 + 1) / 2 = 0.68;  angles: cos = (1, 0.6)
#   φ(2, 1) = ‖[e1 e2]ᵀ u‖² / min(2, 1) = 0.36 (a / max(i, j) would give 0.18);  φ(1, 1) = (e1·u)² = 0
def test_subspace_similarity_at_known_principal_angles() -> None:
    x = torch.tensor([[3.0, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.float64)
    y = torch.tensor([[0, 1.2, 1.6, 0], [1.0, 0, 0, 0]], dtype=torch.float64)
    f64 = torch.float64
    torch.testing.assert_close(subspace_similarity(x, y, 2, 2), torch.tensor(0.68, dtype=f64))
    torch.testing.assert_close(subspace_similarity(x, y, 2, 1), torch.tensor(0.36, dtype=f64))
    torch.testing.assert_close(subspace_similarity(x, y, 1, 2), torch.tensor(1.0, dtype=f64))
    torch.testing.assert_close(
        subspace_similarity(x, y, 1, 1), torch.tensor(0.0, dtype=f64), atol=1e-12, rtol=0
    )
    torch.testing.assert_close(subspace_similarity(x.T, y.T, 2, 2, side="col"), torch.tensor(0.68, dtype=f64))
    want = torch.tensor([0.0, math.degrees(math.acos(0.6))], dtype=f64)  # 0° and 53.13°
    torch.testing.assert_close(principal_angles(x, y, 2, 2).rad2deg(), want, atol=1e-6, rtol=0)


# --- the gate of a bfloat16 layer is computed in float32 -----------------------------------------------------------
# ALoRA, N = 2, r = 1, d_in = 2, d_out = 1, W0 = 0, s = alpha / r = 1, A_1 = (1, 0), A_2 = (-1, 0), B = 1:
#   y = B (g_1 A_1 x + g_2 A_2 x) = (g_1 − g_2) x_0 = (2 g_1 − 1) x_0, with g_1 = sigmoid(l_1 − l_2).
# x = (1, 1), W_g = [[100, 0.30078125], [100, 0]] (all exact in bfloat16):
#   float32 logits (100.30078125, 100): g_1 = sigmoid(0.30078125) = 0.574634, y = 0.149268
#   bfloat16 logits would round 100.30078125 to 100.5: g_1 = sigmoid(0.5) = 0.622459, y = 0.244919
def test_bfloat16_layer_gates_in_float32() -> None:
    cfg = AsymLoraConfig(
        method="alora", router="soft", r=1, lora_alpha=1, num_experts=2, target_modules=["x"]
    )
    layer = Linear(nn.Linear(2, 1, bias=False), "default", cfg, RoutingState())
    t = layer.tensors("default")
    with torch.no_grad():
        layer.get_base_layer().weight.zero_()
        t["A"].copy_(torch.tensor([[[1.0, 0.0]], [[-1.0, 0.0]]]))
        t["B"].fill_(1.0)
        t["router"].copy_(torch.tensor([[100.0, 0.30078125], [100.0, 0.0]]))
    layer = layer.to(torch.bfloat16)
    y = layer(torch.ones(1, 1, 2, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    want = 2 * (1 / (1 + math.exp(-0.30078125))) - 1  # 0.149268
    # bfloat16 output: 8 significant bits, and the gate is cast to bfloat16 before mixing (≤ 0.002 each)
    assert abs(y.item() - want) < 0.006, y.item()


# --- federated aggregation against hand values --------------------------------------------------------------------
def _adapted(method: str = "lora", r: int = 2, d_m: int = 4):
    torch.manual_seed(0)
    cfg = AsymLoraConfig(
        method=method, r=r, lora_alpha=2 * r, intermediate_rank=d_m, target_modules=["q_proj"]
    )
    pm = peft.get_peft_model(make_tiny_llama(hidden=8, layers=1), cfg)
    return role_map(pm), adapter_state(pm)


def _name(roles, tensor: str) -> str:
    (name,) = [n for n, i in roles.items() if i.tensor == tensor]
    return name


def test_fedavg_of_b_with_example_weights_by_hand() -> None:
    # n = (1, 2, 5) -> p = (1/8, 2/8, 5/8); client B = c_k · J + M with J all ones, M = arange (same for all):
    # Σ p_k (c_k J + M) = (8·1 + 0·2 + 16·5)/8 · J + M = 11 J + M  (the unweighted mean would be 8 J + M)
    s = get_strategy("fedalora")
    roles, state = _adapted()
    b = _name(roles, "B")
    server = init_server_state(s, state, roles)
    m = torch.arange(16, dtype=torch.float32).view(8, 2)
    ups = [({b: c * torch.ones(8, 2) + m}, n) for c, n in ((8.0, 1), (0.0, 2), (16.0, 5))]
    res = aggregate(s, server, ups, roles)
    assert res.weights == {0: 0.125, 1: 0.25, 2: 0.625}
    torch.testing.assert_close(res.state[b], 11 * torch.ones(8, 2) + m, rtol=0, atol=0)


def test_fedalora_het_server_update_by_hand() -> None:
    # d_out = 8, d_m = 4; B0 before the round = all ones; n = (1, 3) -> p = (1/4, 3/4).
    # client 1 (rank 1): B2 = 2·e_0 (8 × 1), B1 = (3, 0, 0, 0)      -> B2 B1 has 6 at (0, 0)
    # client 2 (rank 2): B2 = [e_0 e_1] (8 × 2), B1 = [[0, 4, 0, 0], [0, 0, 0, 8]] -> 4 at (0, 1), 8 at (1, 3)
    # B0 ← B0 + Σ p_k B2_k B1_k: (0,0) = 1 + 6/4 = 2.5, (0,1) = 1 + 3·4/4 = 4, (1,3) = 1 + 3·8/4 = 7, else 1.
    # Client 1 uploads the factors (1·(8 + 4) = 12 < 32 values), client 2 the product (2·12 = 24 < 32: factors
    # too, with "auto"), so we force client 2 to send the product: both paths are summed by the server.
    s = get_strategy("fedalora-het")
    roles1, st1 = _adapted("fedhet", r=1)
    roles2, st2 = _adapted("fedhet", r=2)
    b0 = _name(roles1, B0_NAME)
    st1 = {
        **st1,
        _name(roles1, B2_NAME): 2 * torch.eye(8, 1),
        _name(roles1, B1_NAME): torch.tensor([[3.0, 0, 0, 0]]),
    }
    st2 = {
        **st2,
        _name(roles2, B2_NAME): torch.eye(8, 2),
        _name(roles2, B1_NAME): torch.tensor([[0, 4.0, 0, 0], [0, 0, 0, 8.0]]),
    }
    server = {b0: torch.ones(8, 4)}
    up1 = client_upload(s, st1, roles1)
    up2 = client_upload(s, st2, roles2, het_upload="product")
    assert set(up1) == {_name(roles1, B1_NAME), _name(roles1, B2_NAME)} and set(up2) == {b0}
    res = aggregate(s, server, [(up1, 1), (up2, 3)], roles1)
    want = torch.ones(8, 4)
    want[0, 0], want[0, 1], want[1, 3] = 2.5, 4.0, 7.0
    torch.testing.assert_close(res.state[b0], want, rtol=0, atol=0)


def test_zeropad_pad_and_truncate_by_hand() -> None:
    # ranks 1, 2, 3 with n = (1, 1, 2) -> p = (1/4, 1/4, 1/2); client k's A has row j filled with a_kj:
    #   client 1: (4)   client 2: (8, 4)   client 3: (2, 6, 10)
    # padded mean, row 0: 4/4 + 8/4 + 2/2 = 4;  row 1: 0 + 4/4 + 6/2 = 4;  row 2: 0 + 0 + 10/2 = 5
    # B (8 × r) the same along columns. The rank-2 client then starts from rows/columns (4, 4).
    s = get_strategy("zeropad")
    roles3, state3 = _adapted(r=3)
    roles2, state2 = _adapted(r=2)
    a, b = _name(roles3, "A"), _name(roles3, "B")
    rows = {1: [4.0], 2: [8.0, 4.0], 3: [2.0, 6.0, 10.0]}

    def up(r: int) -> dict[str, torch.Tensor]:
        col = torch.tensor(rows[r]).unsqueeze(1)
        return {a: col.expand(r, 8).clone(), b: col.T.expand(8, r).clone()}

    res = aggregate(s, init_server_state(s, state3, roles3), [(up(1), 1), (up(2), 1), (up(3), 2)], roles3)
    want = torch.tensor([4.0, 4.0, 5.0]).unsqueeze(1).expand(3, 8)
    torch.testing.assert_close(res.state[a], want, rtol=0, atol=0)
    torch.testing.assert_close(res.state[b], want.T, rtol=0, atol=0)
    start = client_round_start(s, state2, download_payload(s, res.state), roles2)
    torch.testing.assert_close(start[a], torch.full((2, 8), 4.0), rtol=0, atol=0)
    torch.testing.assert_close(start[b], torch.full((8, 2), 4.0), rtol=0, atol=0)


# --- the seeded A is the same on every client and on the server -------------------------------------------------
@pytest.fixture(scope="module")
def fed_setup(tmp_path_factory):
    """A tiny Llama saved to disk (the clients load it, the server reads its config on the meta device), and
    one tiny choice task per client."""
    from asymlora.data.tasks import Example, Task

    root = tmp_path_factory.mktemp("seeded_a")
    tok = make_char_tokenizer()
    make_tiny_llama(vocab_size=len(tok), hidden=16, layers=1).save_pretrained(root)
    tok.save_pretrained(root)
    ex = [Example(f"{i} odd", t, options=["yes", "no"]) for i, t in enumerate(["no", "yes", "no", "yes"])]
    return root, [Task("parity", "choice", ex, ex[:2], ["accuracy"])]


@pytest.mark.parametrize(("strategy", "local_a"), [("ffa", "persist"), ("fedalora", "reset")])
def test_seeded_a_is_identical_on_clients_and_server(fed_setup, strategy: str, local_a: str) -> None:
    """FFA-LoRA's frozen A and Fed-ALoRA-reset's initial A: every client's A at the start of every round (and
    FFA's after training) equals, bit for bit, the A the server derives from the seed on its meta model."""
    from asymlora.federated.client import adapted_model, client_adapter_config, initial_state, train_round
    from asymlora.federated.config import AdapterSettings, FedConfig, ModelSettings, TrainSettings
    from asymlora.federated.server_app import server_roles

    root, tasks = fed_setup
    cfg = FedConfig(
        model=ModelSettings(name=str(root)),
        local_a=local_a,
        adapter=AdapterSettings(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
        train=TrainSettings(local_steps=2, batch_size=2, lr=0.05),
        seed=7,
    )
    s = cfg.strategy(strategy)
    roles, server = server_roles(cfg, s, [2, 2])
    acfg = client_adapter_config(cfg, s, 2)
    server_a = {n: v for n, v in initial_state(roles, acfg, cfg.seed).items() if roles[n].role == Role.A}
    assert server_a and not set(server_a) & set(server)  # A never travels under either strategy
    carried: dict[int, dict | None] = {0: None, 1: None}
    for rnd in (1, 2):
        ups = []
        for client in (0, 1):
            torch.manual_seed(100 * rnd + client)  # each client process has its own global RNG state
            res = train_round(cfg, s, client, 2, rnd, download_payload(s, server), carried[client], tasks)
            carried[client] = res.trained
            ups.append((res.upload, res.num_examples))
            assert res.a_drift_start == 0.0  # the round started from the client's seeded A …
            if strategy == "ffa":  # … and FFA's A is still the server's after training
                for n, v in server_a.items():
                    assert torch.equal(res.trained[n], v), (client, rnd, n)
            elif rnd == 2:  # Fed-ALoRA trained A away from it (B is non-zero after round 1), then reset it
                assert res.a_drift_end > 0
        server = aggregate(s, server, ups, roles).state
    # a_drift_start == 0 compares with the client's own seeded draw (on its real model): that draw is the
    # server's (on the meta model), bit for bit
    client_init = initial_state(role_map(adapted_model(cfg.model.name, acfg)[0]), acfg, cfg.seed)
    for n, v in server_a.items():
        assert torch.equal(client_init[n], v), n


# --- gaps found by mutation testing (docs/testing.md) ----------------------------------------------------------
def test_balance_loss_when_the_last_expert_never_wins() -> None:
    # t1 (0.6, 0.3, 0.1) top-1 = 0, t2 (0.2, 0.7, 0.1) top-1 = 1: f = (1/2, 1/2, 0), P = (0.4, 0.5, 0.1)
    # L = 3 · (0.5·0.4 + 0.5·0.5 + 0) = 1.35 (f must still have N entries when expert N-1 gets no token)
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1]], dtype=torch.float64)
    torch.testing.assert_close(balance_loss(probs), torch.tensor(1.35, dtype=torch.float64))


def test_task_gate_shapes_by_hand() -> None:
    from asymlora.routing import task_gate

    ids = torch.tensor([2, 0])
    # (batch, features): one one-hot row per example
    assert torch.equal(task_gate(ids, 3, torch.zeros(2, 5)), torch.tensor([[0.0, 0, 1], [1, 0, 0]]))
    # (batch, seq, features): one one-hot per example, broadcast over the sequence axis
    gate = task_gate(ids, 3, torch.zeros(2, 7, 5))
    assert gate.shape == (2, 1, 3) and gate[:, 0].tolist() == [[0.0, 0, 1], [1, 0, 0]]
    # in generate, beams / return sequences repeat each example's id consecutively (RoutingCall.repeat_rows)
    call = RoutingCall(task_ids=ids, repeat_rows=True)
    assert call.task_ids_for(4).tolist() == [2, 2, 0, 0]
    with pytest.raises(ValueError, match=r"^task_ids has 2 entries but the batch has 4 rows"):
        RoutingCall(task_ids=ids).task_ids_for(4)  # outside generate a short task_ids is an error
    with pytest.raises(ValueError, match=r"^task routing needs a batched input \(batch, \.\.\., features\)$"):
        task_gate(ids, 3, torch.zeros(5))
    with pytest.raises(
        ValueError, match=r"^task_ids has 2 entries but the batch has 3 rows; pass one task id per example\.$"
    ):
        task_gate(ids, 3, torch.zeros(3, 5))


@pytest.mark.parametrize("method", ["alora", "hydralora", "molora", "malora"])
def test_layer_on_token_rows_without_a_batch_axis(method: str) -> None:
    # nn.Linear accepts (tokens, d_in): the expert axis must be found from the end, not at a fixed position
    torch.manual_seed(0)
    cfg = AsymLoraConfig(method=method, r=2, num_experts=3, target_modules=["x"])
    layer = Linear(nn.Linear(6, 5, dtype=torch.float64), "default", cfg, RoutingState()).double()
    with torch.no_grad():
        for p in layer.tensors("default").values():
            p.normal_()
    x = torch.randn(4, 6, dtype=torch.float64)
    torch.testing.assert_close(layer(x), layer(x.unsqueeze(0)).squeeze(0))


def test_alora_layer_on_token_rows_by_hand() -> None:
    # N = 2, r = 1, W_g = 0 -> g = (1/2, 1/2); A_1 = (1, 2), A_2 = (3, 4), B = 2, x = (1, 1), s = alpha/r = 1:
    # z = ½·(1 + 2) + ½·(3 + 4) = 5, y = W0 x + 1 · 2 · 5 = 10 (W0 = 0)
    cfg = AsymLoraConfig(method="alora", r=1, lora_alpha=1, num_experts=2, target_modules=["x"])
    layer = Linear(nn.Linear(2, 1, bias=False), "default", cfg, RoutingState())
    t = layer.tensors("default")
    with torch.no_grad():
        layer.get_base_layer().weight.zero_()
        t["A"].copy_(torch.tensor([[[1.0, 2.0]], [[3.0, 4.0]]]))
        t["B"].fill_(2.0)
        t["router"].zero_()
    torch.testing.assert_close(layer(torch.ones(1, 2)), torch.tensor([[10.0]]))


@pytest.mark.parametrize("method", ["alora", "hydralora", "molora", "malora"])
def test_expert_axis_of_every_stacked_tensor_indexes_the_experts(method: str) -> None:
    cfg = AsymLoraConfig(method=method, r=4, num_experts=3, target_modules=["x"])
    specs = get_method(method).specs(cfg, 24, 20)
    stacked = {n: s for n, s in specs.items() if s.expert_dim is not None}
    assert stacked and all(s.shape[s.expert_dim] == 3 for s in stacked.values()), stacked


def test_rank_bounds_are_inclusive() -> None:
    from types import SimpleNamespace

    # fedhet: d_m = 1 is a valid intermediate rank, 0 is not
    assert get_method("fedhet").specs(SimpleNamespace(r=2, intermediate_rank=1), 8, 8)[B0_NAME].shape == (
        8,
        1,
    )
    with pytest.raises(ValueError, match=r"intermediate_rank \(d_m\) must be >= 1, got 0"):
        get_method("fedhet").specs(SimpleNamespace(r=2, intermediate_rank=0), 8, 8)
    # malora: d_sub may equal d_in, not exceed it
    cfg = AsymLoraConfig(method="malora", r=2, num_experts=2, subspace_rank=4, target_modules=["x"])
    assert get_method("malora").specs(cfg, 4, 3)["S"].shape == (4, 4)
    with pytest.raises(ValueError, match="subspace_rank=4 exceeds the layer's input size 3"):
        get_method("malora").specs(cfg, 3, 3)
    # cropped SVD: 1 <= d_sub <= min(N·r̂, d_in) = min(4, 3) = 3, both ends included
    assert cropped_svd_init(K_HAND, 1, 1.0)[0].shape == (1, 3)
    s_a, p = cropped_svd_init(K_HAND, 3, 1.0)  # all directions kept: P_i S_A = K_i exactly
    torch.testing.assert_close(torch.einsum("nrd,di->nri", p, s_a), K_HAND)
    with pytest.raises(ValueError, match=r"= 3$"):
        cropped_svd_init(K_HAND, 4, 1.0)


def test_kaiming_init_bound_per_expert() -> None:
    # Kaiming-uniform with a = √5 (LoRA's A init): bound = sqrt(6 / ((1 + a²)·fan_in)) = 1/sqrt(fan_in), with
    # the fan-in of ONE expert (d_in = 100 -> 0.1), not of the stack. a = 0 would give 0.245, a = √6 0.0926.
    from asymlora.methods.base import kaiming_

    torch.manual_seed(0)
    for t in (torch.empty(8, 100), torch.empty(3, 8, 100)):
        kaiming_(t)
        assert 0.099 < float(t.abs().max()) <= 0.1, t.shape
        assert all(float(piece.abs().max()) > 0.095 for piece in t.view(-1, 8, 100))  # every expert drawn


def test_unknown_method_names_the_choices() -> None:
    with pytest.raises(
        ValueError, match=r"Unknown adapter method 'nope'; choose one of \['alora', 'fedhet', "
    ):
        get_method("nope")


def test_eval_metric_errors_say_what_is_missing() -> None:
    from asymlora.eval.metrics import exact_match, primary_metric, rouge_scores

    with pytest.raises(ValueError, match=r"^exact_match needs at least one reference answer$"):
        exact_match("4", [])
    with pytest.raises(ValueError, match=r"^primary_metric needs a task kind or at least one metric name$"):
        primary_metric([])
    with pytest.raises(ValueError, match=r"^2 predictions but 1 reference lists$"):
        rouge_scores(["a", "b"], ["a"])
    long = "x" * 70  # the message quotes the first 60 characters
    with pytest.raises(ValueError, match=rf"^prediction '{'x' * 60}'… has no reference answer$"):
        rouge_scores([long], [[]])


def test_aggregation_survives_bad_clients_and_keeps_float64() -> None:
    # A rejected client (no examples, a bool count, a bad het update) must not stop the clients after it,
    # and a float64 server state is averaged in float64: (1 + 1e-12)·¼ + (1 + 3e-12)·¾ = 1 + 2.5e-12 exactly
    # enough for float64 (float32 would round it to 1).
    s = get_strategy("fedalora")
    roles, _ = _adapted()
    b = _name(roles, "B")
    server = {b: torch.zeros(8, 2, dtype=torch.float64)}
    one = torch.ones(8, 2, dtype=torch.float64)
    ups = [({b: one}, 0), ({b: one}, True), ({b: one * (1 + 1e-12)}, 1), ({b: one * (1 + 3e-12)}, 3)]
    res = aggregate(s, server, ups, roles, client_ids=["none", "bool", "a", "b"])
    assert res.accepted == ["a", "b"] and [r.client for r in res.rejected] == ["none", "bool"]
    assert "num_examples=True" in res.rejected[1].reason
    torch.testing.assert_close(res.state[b], one * (1 + 2.5e-12), rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match=r"^1 client ids for 2 updates$"):
        aggregate(s, server, ups[2:], roles, client_ids=["a"])
    # zero padding in float64 too: rank 1 (n = 1) and rank 2 (n = 1) -> row 0 = (1 + 1e-12 + 1)/2
    z = get_strategy("zeropad")
    roles2, _ = _adapted(r=2)
    a2, b2 = _name(roles2, "A"), _name(roles2, "B")
    server = {a2: torch.zeros(2, 8, dtype=torch.float64), b2: torch.zeros(8, 2, dtype=torch.float64)}
    up1 = {a2: torch.full((1, 8), 1 + 1e-12, dtype=torch.float64), b2: torch.ones(8, 1, dtype=torch.float64)}
    up2 = {a2: torch.ones(2, 8, dtype=torch.float64), b2: torch.ones(8, 2, dtype=torch.float64)}
    res = aggregate(z, server, [(up1, 1), (up2, 1)], roles2)
    torch.testing.assert_close(
        res.state[a2][0], torch.full((8,), 1 + 0.5e-12, dtype=torch.float64), rtol=0, atol=1e-15
    )
    # Fed-ALoRA-het: a malformed update is recorded under its client id; the next client still counts
    h = get_strategy("fedalora-het")
    roles_h, _ = _adapted("fedhet", r=1)
    b0 = _name(roles_h, B0_NAME)
    res = aggregate(
        h,
        {b0: torch.zeros(8, 4)},
        [({b0: torch.ones(3, 4)}, 1), ({b0: torch.ones(8, 4)}, 1)],
        roles_h,
        ["x", "y"],
    )
    assert res.accepted == ["y"] and res.rejected[0].client == "x"
    torch.testing.assert_close(res.state[b0], torch.ones(8, 4))


def test_het_upload_choice_at_the_boundary_and_forced() -> None:
    # d_out = 8, d_m = 8, r = 4: factors 4·(8 + 8) = 64 values = the product's 8·8: not smaller -> the product
    s = get_strategy("fedalora-het")
    roles, state = _adapted("fedhet", r=4, d_m=8)
    assert {roles[n].tensor for n in client_upload(s, state, roles)} == {B0_NAME}
    # r = 3, d_m = 4: factors 3·12 = 36 > 32, the product is smaller, but "factors" forces them
    roles, state = _adapted("fedhet", r=3, d_m=4)
    assert {roles[n].tensor for n in client_upload(s, state, roles, het_upload="factors")} == {
        B1_NAME,
        B2_NAME,
    }
