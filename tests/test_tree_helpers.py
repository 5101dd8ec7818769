"""fusedecode.tree's layout converters: first-child / next-sibling arrays (SGLang's
retrive_next_token / retrive_next_sibling) to and from parents."""

import pytest
import torch

from fusedecode.tree import tree_attention_mask, tree_from_next_sibling, tree_from_paths, tree_to_next_sibling

# 0 -> 1, 2, 5;  1 -> 3, 4;  2 -> 6;  6 -> 7
PARENTS = torch.tensor([-1, 0, 0, 1, 1, 0, 2, 6])
FIRST_CHILD = torch.tensor([1, 3, 6, -1, -1, -1, 7, -1])
NEXT_SIBLING = torch.tensor([-1, 2, 5, 4, -1, -1, -1, -1])


def random_parents(nodes, generator):
    return torch.tensor([-1] + [int(torch.randint(0, i, (), generator=generator)) for i in range(1, nodes)])


def test_hand_built_tree_both_ways():
    first_child, next_sibling = tree_to_next_sibling(PARENTS)
    assert first_child.tolist() == FIRST_CHILD.tolist()
    assert next_sibling.tolist() == NEXT_SIBLING.tolist()
    assert tree_from_next_sibling(FIRST_CHILD, NEXT_SIBLING).tolist() == PARENTS.tolist()
    # Plain lists are accepted, as SGLang keeps them.
    assert tree_from_next_sibling(FIRST_CHILD.tolist(), NEXT_SIBLING.tolist()).tolist() == PARENTS.tolist()


def test_single_node_and_chain():
    assert [t.tolist() for t in tree_to_next_sibling(torch.tensor([-1]))] == [[-1], [-1]]
    assert tree_from_next_sibling([-1], [-1]).tolist() == [-1]
    chain = torch.tensor([-1, 0, 1, 2])
    assert [t.tolist() for t in tree_to_next_sibling(chain)] == [[1, 2, 3, -1], [-1, -1, -1, -1]]
    assert tree_from_next_sibling([1, 2, 3, -1], [-1, -1, -1, -1]).tolist() == chain.tolist()


def test_sibling_order_is_the_index_order():
    # The next sibling of a node is the next node (by index) with the same parent, however far.
    parents = torch.tensor([-1, 0, 1, 0, 1, 0])
    first_child, next_sibling = tree_to_next_sibling(parents)
    assert first_child.tolist() == [1, 2, -1, -1, -1, -1]
    assert next_sibling.tolist() == [-1, 3, 4, 5, -1, -1]


@pytest.mark.parametrize("nodes", [1, 2, 7, 40])
def test_random_trees_round_trip_one_and_batched(nodes, generator):
    rows = torch.stack([random_parents(nodes, generator) for _ in range(5)])
    first_child, next_sibling = tree_to_next_sibling(rows)
    assert first_child.shape == next_sibling.shape == rows.shape
    assert torch.equal(tree_from_next_sibling(first_child, next_sibling), rows)
    for b in range(rows.shape[0]):
        one = tree_to_next_sibling(rows[b])
        assert torch.equal(one[0], first_child[b]) and torch.equal(one[1], next_sibling[b])
        # The arrays say what parents says: node c is reached from p's first child along siblings.
        for c in range(1, nodes):
            node = int(first_child[b, rows[b, c]])
            while node != c:
                assert node != -1, (b, c)
                node = int(next_sibling[b, node])
    # int32 parents give the same arrays.
    assert torch.equal(tree_to_next_sibling(rows.to(torch.int32))[0], first_child)


def test_paths_layout_agrees():
    tokens, parents = tree_from_paths([[5, 7], [5, 8], [6], [9, 1, 2]], root_token=0)
    first_child, next_sibling = tree_to_next_sibling(parents)
    assert torch.equal(tree_from_next_sibling(first_child, next_sibling), parents)
    # Children of the root in path order: 5 (node 1), 6, 9.
    children, node = [], int(first_child[0])
    while node != -1:
        children.append(int(tokens[node]))
        node = int(next_sibling[node])
    assert children == [5, 6, 9]


@pytest.mark.parametrize("first_child,next_sibling,match", [
    ([2, -1, -1], [-1, -1, 1], "increasing"),  # sibling chain 2 -> 1 goes backwards
    ([0, -1], [-1, -1], "reached twice|out of range|increasing"),  # the root as its own child
    ([1, 1], [-1, -1], "reached twice"),  # node 1 is the child of 0 and of itself
    ([1, -1, -1], [-1, -1, -1], "not reachable"),  # node 2 hangs in the air
    ([1, -1], [-1, 5], "out of range"),  # node 1's next sibling
    ([1, -1, -1], [2, -1, -1], "root .* no siblings"),  # the root's next sibling would be ignored
    ([1, -1], [-1, -1, -1], "same shape"),
    ([[1, -1]], [1, -1], "same shape"),
    ([[[1]]], [[[1]]], "same shape"),
])
def test_from_next_sibling_errors(first_child, next_sibling, match):
    with pytest.raises(ValueError, match=match):
        tree_from_next_sibling(first_child, next_sibling)


def test_from_next_sibling_error_names_the_row():
    with pytest.raises(ValueError, match="row 1"):
        tree_from_next_sibling([[1, -1, -1], [2, -1, -1]], [[-1, 2, -1], [-1, -1, 1]])


@pytest.mark.parametrize("parents", [
    [0, 0, 1],  # root not -1
    [-1, 1, 1],  # self-parent
    [-1, 2, 0],  # parent after its child
    [-1, 0, 5],  # out of range
    [-1, -1, 0],  # a second root
])
def test_to_next_sibling_refuses_invalid_trees(parents):
    with pytest.raises(ValueError, match="parents"):
        tree_to_next_sibling(torch.tensor(parents))


def test_to_next_sibling_refuses_non_integer_parents():
    with pytest.raises(ValueError, match="parents"):
        tree_to_next_sibling(torch.tensor([-1.0, 0.0]))


def _ancestors_mask(parents):
    """Brute force: node i attends to itself and every node on its path to the root."""
    nodes = len(parents)
    mask = torch.zeros(nodes, nodes, dtype=torch.bool)
    for i in range(nodes):
        node = i
        while node >= 0:
            mask[i, node] = True
            node = int(parents[node])
    return mask


@pytest.mark.parametrize("nodes", list(range(1, 20)) + [31, 32, 33, 63, 64, 65, 129])
def test_attention_mask_of_chains_and_random_trees(nodes, generator):
    """Chains of every length around the powers of two (the deepest node decides how many pointer-
    doubling rounds the mask needs) and random trees, one and batched, against brute force."""
    chain = torch.arange(-1, nodes - 1)
    assert torch.equal(tree_attention_mask(chain), _ancestors_mask(chain))
    rows = torch.stack([random_parents(nodes, generator) for _ in range(4)] + [chain])
    batched = tree_attention_mask(rows)
    for b in range(rows.shape[0]):
        expected = _ancestors_mask(rows[b])
        assert torch.equal(batched[b], expected) and torch.equal(tree_attention_mask(rows[b]), expected)
