import pytest

from kvstore.backends import open_store
from kvstore.backends.local import LocalStore
from kvstore.errors import ConfigError
from kvstore.testing import StoreTests


class TestLocalStore(StoreTests):
    @pytest.fixture
    async def store(self, tmp_path):
        async with open_store(tmp_path.as_uri()) as store:
            yield store


def test_file_url_and_plain_path_open_the_same_directory(tmp_path):
    assert open_store(tmp_path.as_uri()).root == tmp_path
    assert open_store(str(tmp_path)).root == tmp_path
    with pytest.raises(ConfigError):
        open_store("file://remotehost/x")


async def test_no_partial_files_visible_and_temp_files_not_listed(tmp_path):
    store = LocalStore(tmp_path)
    await store.put("a/b", b"x" * 1000)
    (tmp_path / "a" / ".b.tmp-deadbeef").write_bytes(b"partial")
    assert {k async for k in store.list()} == {"a/b"}
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [".b.tmp-deadbeef", "b"]
