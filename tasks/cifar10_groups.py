"""ImageNet-1k -> CIFAR-10 class groups (each CIFAR-10 logit = log-sum-exp of its group).

Indices use the standard ImageNet-1k order (torchvision ``ResNet50_Weights.IMAGENET1K_V1``). Groups
were hand-curated from the category names following the WordNet hyponyms of each CIFAR class: dog =
all dog breeds (151-268; wolves, foxes, dingo, dhole, African hunting dog excluded); cat = the
domestic cats (281-285; no wild/big cats); bird = every bird (7-24, 80-100, 127-146); frog = the
three frogs (30-32); airplane = airliner, warplane, wing (726 "plane" is the carpenter's tool;
airship, space shuttle out); automobile = WordNet cars (incl. ambulance and minivan, which WordNet
files under car); truck = WordNet trucks and vans (incl. moving van, police van); ship = vessels,
ships and boats alike (incl. wreck; paddlewheel and amphibian excluded). Judgement calls: ImageNet
has no deer, so deer is approximated by the deer-like antelopes hartebeest, impala, gazelle (ibex,
bighorn excluded); horse = sorrel only (zebra is not a horse, horse cart is a cart); pickup goes to
neither car nor truck, as CIFAR-10's own class definitions exclude pickups from both; buses,
tractors, forklifts, snowplows, RVs are left out. ImageNet classes in no group are ignored.
"""

CIFAR10_GROUPS: dict[str, tuple[int, ...]] = {
    "airplane": (
        404,  # airliner
        895,  # warplane
        908,  # wing
    ),
    "automobile": (
        407,  # ambulance
        436,  # beach wagon
        468,  # cab
        511,  # convertible
        609,  # jeep
        627,  # limousine
        656,  # minivan
        661,  # Model T
        751,  # racer
        817,  # sports car
    ),
    "bird": (
        7,  # cock
        8,  # hen
        9,  # ostrich
        10,  # brambling
        11,  # goldfinch
        12,  # house finch
        13,  # junco
        14,  # indigo bunting
        15,  # robin
        16,  # bulbul
        17,  # jay
        18,  # magpie
        19,  # chickadee
        20,  # water ouzel
        21,  # kite
        22,  # bald eagle
        23,  # vulture
        24,  # great grey owl
        80,  # black grouse
        81,  # ptarmigan
        82,  # ruffed grouse
        83,  # prairie chicken
        84,  # peacock
        85,  # quail
        86,  # partridge
        87,  # African grey
        88,  # macaw
        89,  # sulphur-crested cockatoo
        90,  # lorikeet
        91,  # coucal
        92,  # bee eater
        93,  # hornbill
        94,  # hummingbird
        95,  # jacamar
        96,  # toucan
        97,  # drake
        98,  # red-breasted merganser
        99,  # goose
        100,  # black swan
        127,  # white stork
        128,  # black stork
        129,  # spoonbill
        130,  # flamingo
        131,  # little blue heron
        132,  # American egret
        133,  # bittern
        134,  # crane bird
        135,  # limpkin
        136,  # European gallinule
        137,  # American coot
        138,  # bustard
        139,  # ruddy turnstone
        140,  # red-backed sandpiper
        141,  # redshank
        142,  # dowitcher
        143,  # oystercatcher
        144,  # pelican
        145,  # king penguin
        146,  # albatross
    ),
    "cat": (
        281,  # tabby
        282,  # tiger cat
        283,  # Persian cat
        284,  # Siamese cat
        285,  # Egyptian cat
    ),
    "deer": (
        351,  # hartebeest
        352,  # impala
        353,  # gazelle
    ),
    "dog": (
        151,  # Chihuahua
        152,  # Japanese spaniel
        153,  # Maltese dog
        154,  # Pekinese
        155,  # Shih-Tzu
        156,  # Blenheim spaniel
        157,  # papillon
        158,  # toy terrier
        159,  # Rhodesian ridgeback
        160,  # Afghan hound
        161,  # basset
        162,  # beagle
        163,  # bloodhound
        164,  # bluetick
        165,  # black-and-tan coonhound
        166,  # Walker hound
        167,  # English foxhound
        168,  # redbone
        169,  # borzoi
        170,  # Irish wolfhound
        171,  # Italian greyhound
        172,  # whippet
        173,  # Ibizan hound
        174,  # Norwegian elkhound
        175,  # otterhound
        176,  # Saluki
        177,  # Scottish deerhound
        178,  # Weimaraner
        179,  # Staffordshire bullterrier
        180,  # American Staffordshire terrier
        181,  # Bedlington terrier
        182,  # Border terrier
        183,  # Kerry blue terrier
        184,  # Irish terrier
        185,  # Norfolk terrier
        186,  # Norwich terrier
        187,  # Yorkshire terrier
        188,  # wire-haired fox terrier
        189,  # Lakeland terrier
        190,  # Sealyham terrier
        191,  # Airedale
        192,  # cairn
        193,  # Australian terrier
        194,  # Dandie Dinmont
        195,  # Boston bull
        196,  # miniature schnauzer
        197,  # giant schnauzer
        198,  # standard schnauzer
        199,  # Scotch terrier
        200,  # Tibetan terrier
        201,  # silky terrier
        202,  # soft-coated wheaten terrier
        203,  # West Highland white terrier
        204,  # Lhasa
        205,  # flat-coated retriever
        206,  # curly-coated retriever
        207,  # golden retriever
        208,  # Labrador retriever
        209,  # Chesapeake Bay retriever
        210,  # German short-haired pointer
        211,  # vizsla
        212,  # English setter
        213,  # Irish setter
        214,  # Gordon setter
        215,  # Brittany spaniel
        216,  # clumber
        217,  # English springer
        218,  # Welsh springer spaniel
        219,  # cocker spaniel
        220,  # Sussex spaniel
        221,  # Irish water spaniel
        222,  # kuvasz
        223,  # schipperke
        224,  # groenendael
        225,  # malinois
        226,  # briard
        227,  # kelpie
        228,  # komondor
        229,  # Old English sheepdog
        230,  # Shetland sheepdog
        231,  # collie
        232,  # Border collie
        233,  # Bouvier des Flandres
        234,  # Rottweiler
        235,  # German shepherd
        236,  # Doberman
        237,  # miniature pinscher
        238,  # Greater Swiss Mountain dog
        239,  # Bernese mountain dog
        240,  # Appenzeller
        241,  # EntleBucher
        242,  # boxer
        243,  # bull mastiff
        244,  # Tibetan mastiff
        245,  # French bulldog
        246,  # Great Dane
        247,  # Saint Bernard
        248,  # Eskimo dog
        249,  # malamute
        250,  # Siberian husky
        251,  # dalmatian
        252,  # affenpinscher
        253,  # basenji
        254,  # pug
        255,  # Leonberg
        256,  # Newfoundland
        257,  # Great Pyrenees
        258,  # Samoyed
        259,  # Pomeranian
        260,  # chow
        261,  # keeshond
        262,  # Brabancon griffon
        263,  # Pembroke
        264,  # Cardigan
        265,  # toy poodle
        266,  # miniature poodle
        267,  # standard poodle
        268,  # Mexican hairless
    ),
    "frog": (
        30,  # bullfrog
        31,  # tree frog
        32,  # tailed frog
    ),
    "horse": (
        339,  # sorrel
    ),
    "ship": (
        403,  # aircraft carrier
        472,  # canoe
        484,  # catamaran
        510,  # container ship
        554,  # fireboat
        576,  # gondola
        625,  # lifeboat
        628,  # liner
        724,  # pirate
        780,  # schooner
        814,  # speedboat
        833,  # submarine
        871,  # trimaran
        913,  # wreck
        914,  # yawl
    ),
    "truck": (
        555,  # fire engine
        569,  # garbage truck
        675,  # moving van
        734,  # police van
        864,  # tow truck
        867,  # trailer truck
    ),
}
