"""The synthetic batch sources benchmarks train on: their layout is what they claim."""

import numpy as np
import pytest

from retro_jax.data.synthetic import KeyValueRecallSource
from retro_jax.models import cca

M, K, PAIRS = 16, 2, 3


def _source(**kw):
  return KeyValueRecallSource(512, 4, chunk_length=M, num_neighbors=K,
                              pairs_per_neighbor=PAIRS, shard_id=0, num_shards=1, **kw)


def _is_filler(tokens):
  low, high = KeyValueRecallSource.FILLER
  return np.all((tokens >= low) & (tokens < high))


def test_key_value_recall_answers_are_only_in_chunk_0s_neighbors():
  source = _source()
  batch = source.get_batch(3)
  again = source.get_batch(3)
  assert all(np.array_equal(batch[key], again[key]) for key in batch)
  inputs, targets = batch["decoder_input_tokens"], batch["decoder_target_tokens"]
  assert inputs.shape == (4, 2 * M) and batch["neighbor_tokens"].shape == (4, 2, K, 2 * M)
  assert np.array_equal(inputs[:, 1:], targets[:, :-1])
  for e in range(4):
    neighbors = batch["neighbor_tokens"][e]
    table = {}
    for j in range(K):
      row = neighbors[0, j]
      table.update(zip(row[:2 * PAIRS:2], row[1:2 * PAIRS:2]))
      assert _is_filler(row[2 * PAIRS:])
    assert len(table) == K * PAIRS            # distinct keys
    assert _is_filler(neighbors[1]) and _is_filler(inputs[e, :M - 1])
    scored = np.nonzero(batch["decoder_loss_weights"][e])[0]
    assert list(scored) == list(range(M - 1, 2 * M - 2, 2))
    # Every scored position reads chunk 0's neighbors (RETRO's shift), and its target
    # is the value paired there with its input key.
    assert np.all(cca.neighbor_chunk_of_token(scored, M) == 0)
    assert [table[k] for k in inputs[e, scored]] == list(targets[e, scored])
    assert all(v >= source.value_start for v in table.values())
    assert all(source.key_start <= k < source.value_start for k in table)


def test_key_value_recall_control_puts_the_same_pairs_in_the_prompt():
  neighbors, prompt = _source().get_batch(0), _source(pairs_in="prompt").get_batch(0)
  pairs = neighbors["neighbor_tokens"][:, 0, :, :2 * PAIRS].reshape(4, -1)
  assert np.array_equal(prompt["decoder_input_tokens"][:, :2 * K * PAIRS], pairs)
  assert _is_filler(prompt["neighbor_tokens"])
  assert np.array_equal(prompt["decoder_target_tokens"][:, M - 1:],
                        neighbors["decoder_target_tokens"][:, M - 1:])


@pytest.mark.parametrize("kw, message", [
    (dict(pairs_per_neighbor=M + 1), "pairs_per_neighbor"),
    (dict(pairs_per_neighbor=8, pairs_in="prompt"), "do not fit"),
    (dict(pairs_in="encoder"), "pairs_in"),
    (dict(num_keys=3), "key ids"),
])
def test_key_value_recall_rejects_layouts_it_cannot_make(kw, message):
  args = dict(chunk_length=M, num_neighbors=K, pairs_per_neighbor=PAIRS, shard_id=0,
              num_shards=1)
  with pytest.raises(ValueError, match=message):
    KeyValueRecallSource(512, 4, **dict(args, **kw))
