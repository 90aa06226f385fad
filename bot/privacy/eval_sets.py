"""Evaluation sets the privacy evaluation builds itself, from public lists and random values.

- ``planted_secrets``: credentials of every kind the secret layer claims, with random values from a
  seeded generator (formats as the vendors document them), in sentence templates. Nothing here was
  picked by looking at what the detector catches.
- ``held_out_names``: people's names in other scripts, drawn only from the third of Faker's name
  lists that ``scripts.in_recognizer_half`` keeps away from the recognizer, in English and native
  sentence templates.
- ``non_name_sentences``: text in those scripts that holds no name: Faker's lorem sentences of each
  language and support sentences written for this set; any PERSON mask on them is a false mask.
"""

from __future__ import annotations

import base64
import json
import random
import string
import unicodedata
from importlib import import_module

from bot.privacy.scripts import faker_name_lists, name_split

Planted = tuple[str, str, list[tuple[int, int]]]  # (kind, text, spans that must be masked)

ALNUM = string.ascii_letters + string.digits
UPPER_DIGITS = string.ascii_uppercase + string.digits


def _pick(rng: random.Random, chars: str, n: int) -> str:
    return "".join(rng.choice(chars) for _ in range(n))


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _password(rng: random.Random) -> str:
    length = rng.randint(8, 16)
    chars = [
        rng.choice(string.ascii_lowercase),
        rng.choice(string.ascii_uppercase),
        rng.choice(string.digits),
    ]
    chars += [rng.choice(ALNUM + "!#$%&*+-?@^_~") for _ in range(length - 3)]
    rng.shuffle(chars)
    return "".join(chars)


def _jwt(rng: random.Random) -> str:
    header = _b64url(json.dumps({"alg": rng.choice(["HS256", "RS256"]), "typ": "JWT"}).encode())
    claims = {"sub": str(rng.randint(1, 10**9)), "iat": rng.randint(1_500_000_000, 1_800_000_000)}
    return f"{header}.{_b64url(json.dumps(claims).encode())}.{_b64url(rng.randbytes(32))}"


def _pem(rng: random.Random) -> str:
    kind = rng.choice(["RSA ", "EC ", "OPENSSH ", ""])
    body = base64.b64encode(rng.randbytes(rng.randint(90, 300))).decode()
    lines = "\n".join(body[i : i + 64] for i in range(0, len(body), 64))
    return f"-----BEGIN {kind}PRIVATE KEY-----\n{lines}\n-----END {kind}PRIVATE KEY-----"


def _generators(rng: random.Random) -> dict[str, list[str]]:
    """Per kind: value templates where ``{v}`` is the random secret (the span to mask)."""
    return {
        "password": [
            "my password is {v}",
            "the admin password for the printer is {v} btw",
            "pwd: {v}",
            "passwd={v}",
            "login admin / password {v}",
            "Password: {v}\nplease reset it",
            "wifi password is now {v}, tell the team",
        ],
        "pin": ["my PIN is {v}", "PIN {v}", "card pin: {v}", "the door pin code is {v}."],
        "aws_access_key_id": ["aws key {v} stopped working", "AWS_ACCESS_KEY_ID={v}"],
        "aws_secret_key": ["aws_secret_access_key = {v}", "AWS secret key: {v}"],
        "slack_token": ["the bot uses {v} as token", "SLACK_BOT_TOKEN={v}", "{v}"],
        "github_token": ["git push fails with {v}", "GITHUB_TOKEN={v} in the runner"],
        "stripe_key": ["stripe key {v} leaked?", "STRIPE_SECRET_KEY={v}"],
        "generic_key": [
            "api_key: {v}",
            "the api key is {v}",
            "token={v}",
            "secret: {v}",
            "Authorization: Bearer {v}",
        ],
        "jwt": ["Authorization: Bearer {v}", "the cookie holds {v} after login", "jwt={v}"],
        "private_key": ["here is the key:\n{v}\nthanks", "{v}"],
        "connection_string": ["DATABASE_URL={v}", "connect with {v} from the app server", "uri: {v}"],
        "basic_auth_url": ["open {v} in the browser", "the webhook posts to {v}"],
    }


def _value(kind: str, rng: random.Random) -> str:
    if kind == "password":
        return _password(rng)
    if kind == "pin":
        return _pick(rng, string.digits, rng.choice([4, 4, 6, 8]))
    if kind == "aws_access_key_id":
        return rng.choice(["AKIA", "ASIA"]) + _pick(rng, UPPER_DIGITS, 16)
    if kind == "aws_secret_key":
        return _pick(rng, ALNUM + "/+", 40)
    if kind == "slack_token":
        prefix = rng.choice(["xoxb", "xoxp"])
        if rng.random() < 0.3:
            return f"xapp-1-A{_pick(rng, UPPER_DIGITS, 10)}-{rng.randint(10**12, 10**13)}-{_pick(rng, '0123456789abcdef', 64)}"
        return f"{prefix}-{rng.randint(10**11, 10**12)}-{rng.randint(10**12, 10**13)}-{_pick(rng, ALNUM, 24)}"
    if kind == "github_token":
        if rng.random() < 0.3:
            return f"github_pat_{_pick(rng, ALNUM, 22)}_{_pick(rng, ALNUM, 59)}"
        return rng.choice(["ghp", "gho", "ghu", "ghs"]) + "_" + _pick(rng, ALNUM, 36)
    if kind == "stripe_key":
        return rng.choice(["sk_live_", "rk_live_"]) + _pick(rng, ALNUM, rng.choice([24, 99]))
    if kind == "generic_key":
        return _pick(rng, rng.choice([ALNUM, "0123456789abcdef", ALNUM + "-_"]), rng.randint(20, 48))
    if kind == "jwt":
        return _jwt(rng)
    if kind == "private_key":
        return _pem(rng)
    user = _pick(rng, string.ascii_lowercase, rng.randint(3, 8))
    password = _password(rng).replace("@", "x").replace("/", "x").replace("?", "x").replace("#", "x")
    host = f"{_pick(rng, string.ascii_lowercase, 6)}.{rng.choice(['example.com', 'corp.example.org', 'internal'])}"
    if kind == "connection_string":
        scheme = rng.choice(["postgres", "postgresql", "mysql", "mongodb+srv", "redis", "amqp"])
        return f"{scheme}://{user}:{password}@{host}:{rng.randint(1000, 9999)}/{_pick(rng, string.ascii_lowercase, 5)}"
    return f"https://{user}:{password}@{host}/{_pick(rng, string.ascii_lowercase, 6)}"


def planted_secrets(per_kind: int = 40, seed: int = 10) -> list[Planted]:
    rng = random.Random(seed)
    rows: list[Planted] = []
    for kind, templates in _generators(rng).items():
        for i in range(per_kind):
            template = templates[i % len(templates)]
            value = _value(kind, rng)
            at = template.index("{v}")
            text = template.replace("{v}", value)
            rows.append((kind, text, [(at, at + len(value))]))
    return rows


# Sentence templates; {n} is the name. English first: the bot's chat is English, names are not.
ENGLISH_TEMPLATES = (
    "Hi, I'm {n}, my laptop won't boot",
    "please ask {n} about the VPN",
    "cc {n}",
    "{n} fixed the printer yesterday but it jams again",
    "Thanks {n}, it works now",
    "can {n} reset my password?",
    "I sent the logs to {n} last week",
    "meeting with {n} at 3pm about the docking station",
)
NATIVE_TEMPLATES = {
    "cyrillic": (
        "Меня зовут {n}, у меня не работает принтер.",
        "Спросите {n} про VPN.",
        "Вчера {n} настроил почту на ноутбуке.",
        "{n} обещал заменить картридж.",
    ),
    "greek": (
        "Με λένε {n} και ο υπολογιστής μου δεν ξεκινά.",
        "Ρωτήστε τον {n} για το VPN.",
        "Χθες ο {n} άλλαξε τον κωδικό του εκτυπωτή.",
    ),
    "arabic": (
        "اسمي {n} والحاسوب لا يعمل.",
        "اسأل {n} عن الطابعة.",
        "تواصل مع {n} بخصوص الشبكة.",
    ),
    "devanagari": (
        "मेरा नाम {n} है और मेरा लैपटॉप चालू नहीं होता।",
        "कल {n} ने प्रिंटर ठीक किया।",
        "कृपया {n} जी को बताइए कि सर्वर बंद है।",
    ),
    "hangul": (
        "{n} 씨에게 프린터에 대해 물어보세요.",
        "어제 {n}님이 프린터를 고쳤어요.",
        "{n}에게 VPN 문제를 알려 주세요.",
    ),
    "cjk": (
        "我是{n}，我的电脑开不了机。",
        "请联系{n}处理打印机问题。",
        "{n}先生说打印机坏了。",
        "{n}さんにVPNについて聞いてください。",
    ),
}
# The reported set's templates: written after the finder's rules were fixed, never tuned on.
ENGLISH_TEST_TEMPLATES = (
    "Hello, this is {n} from accounting, Outlook keeps crashing",
    "{n} says the projector in room 4 is dead",
    "could you forward this to {n}?",
    "ticket opened by {n} on Monday",
    "{n} and I both lost access to the shared drive",
    "my manager {n} approved the new monitor",
)
NATIVE_TEST_TEMPLATES = {
    "cyrillic": (
        "Здравствуйте, это {n}, у меня не открывается Outlook.",
        "Мой руководитель {n} одобрил новый монитор.",
        "Заявку открыл {n} в понедельник.",
    ),
    "greek": (
        "Γεια σας, είμαι ο {n} από το λογιστήριο.",
        "Ο προϊστάμενός μου {n} ενέκρινε τη νέα οθόνη.",
        "Το αίτημα το άνοιξε η {n} τη Δευτέρα.",
    ),
    "arabic": (
        "مرحبا، معك {n} من قسم المحاسبة.",
        "وافق مديري {n} على الشاشة الجديدة.",
        "فتح {n} التذكرة يوم الاثنين.",
    ),
    "devanagari": (
        "नमस्ते, मैं लेखा विभाग से {n} बोल रहा हूँ।",
        "मेरे मैनेजर {n} ने नया मॉनिटर मंज़ूर किया।",
        "यह टिकट {n} ने सोमवार को खोला।",
    ),
    "hangul": (
        "안녕하세요, 회계팀 {n}입니다.",
        "{n} 팀장님이 새 모니터를 승인했어요.",
        "월요일에 {n} 씨가 티켓을 열었습니다.",
    ),
    "cjk": (
        "你好，我是财务部的{n}。",
        "我的经理{n}批准了新显示器。",
        "{n}さんが月曜日にチケットを作成しました。",
    ),
}
UNSPACED = ("hangul", "cjk")  # family and given name written together


def _plain(name: str) -> bool:
    return all(ch.isalpha() or unicodedata.category(ch).startswith("M") or ch in "-'\u02bc" for ch in name)


def held_out_names(
    part: str = "test", per_script: int = 60, seed: int = 10
) -> list[tuple[str, str, list[tuple[int, int]]]]:
    """(script, sentence, name spans) with names only from the held-out ``part`` ("dev" or "test") of the
    lists; "test" also has its own sentence templates, never used while adjusting the finder."""
    rng = random.Random(seed)
    rows = []
    english = ENGLISH_TEMPLATES if part == "dev" else ENGLISH_TEST_TEMPLATES
    native = NATIVE_TEMPLATES if part == "dev" else NATIVE_TEST_TEMPLATES
    for script, parts in sorted(faker_name_lists().items()):
        # Entries with brackets or spaces are list notes ("(श्रेष्ठ)"), not names as people write them.
        given = sorted(n for n in parts["given"] if name_split(n) == part and _plain(n))
        family = sorted(n for n in parts["family"] if name_split(n) == part and _plain(n))
        templates = [(t, "en") for t in english] + [(t, "native") for t in native[script]]
        for i in range(per_script):
            first = rng.choice(given)
            if script in UNSPACED:
                name = rng.choice(family) + first if family and rng.random() < 0.8 else first
            else:
                name = f"{first} {rng.choice(family)}" if family and rng.random() < 0.6 else first
            template, _ = templates[i % len(templates)]
            at = template.index("{n}")
            rows.append((script, template.replace("{n}", name), [(at, at + len(name))]))
    return rows


# Support sentences without any name, written for this set (one per line and script).
SUPPORT_SENTENCES = {
    "cyrillic": (
        "Принтер на третьем этаже не печатает, пишет замятие бумаги.",
        "После обновления Windows ноутбук не видит док-станцию.",
        "VPN отключается каждые десять минут, перезагрузка не помогает.",
        "Не могу войти в почту, пароль истёк вчера.",
        "Сервер в Москве не отвечает с утра.",
        "Монитор Dell мигает при подключении через HDMI.",
    ),
    "greek": (
        "Ο εκτυπωτής στον δεύτερο όροφο δεν τυπώνει.",
        "Μετά την ενημέρωση των Windows το laptop δεν ξεκινά.",
        "Το VPN αποσυνδέεται κάθε δέκα λεπτά.",
        "Η οθόνη τρεμοπαίζει όταν συνδέω το καλώδιο HDMI.",
    ),
    "arabic": (
        "الطابعة في الطابق الثالث لا تطبع وتظهر رسالة انحشار الورق.",
        "بعد تحديث ويندوز لا يتعرف الحاسوب على محطة الإرساء.",
        "ينقطع الاتصال بالشبكة الافتراضية كل عشر دقائق.",
        "لا أستطيع الدخول إلى البريد لأن كلمة المرور انتهت.",
    ),
    "devanagari": (
        "तीसरी मंज़िल का प्रिंटर नहीं छाप रहा है।",
        "विंडोज़ अपडेट के बाद लैपटॉप डॉकिंग स्टेशन नहीं पहचानता।",
        "वीपीएन हर दस मिनट में कट जाता है।",
        "ईमेल में लॉगिन नहीं हो रहा, पासवर्ड की अवधि खत्म हो गई।",
        "मॉनिटर एचडीएमआई केबल लगाने पर झपकता है।",
    ),
    "hangul": (
        "3층 프린터가 인쇄되지 않고 용지 걸림이라고 나옵니다.",
        "윈도우 업데이트 후 노트북이 도킹 스테이션을 인식하지 못합니다.",
        "VPN이 10분마다 끊어집니다.",
        "비밀번호가 만료되어 메일에 로그인할 수 없습니다.",
        "모니터가 HDMI 케이블을 연결하면 깜박입니다.",
    ),
    "cjk": (
        "三楼的打印机无法打印，显示卡纸。",
        "更新系统后笔记本电脑无法识别扩展坞。",
        "VPN每隔十分钟就断开一次。",
        "密码过期了，无法登录邮箱。",
        "プリンターが紙詰まりで印刷できません。",
        "アップデートの後、ノートパソコンがドッキングステーションを認識しません。",
    ),
}
LOREM_LOCALES = {
    "cyrillic": ("ru_RU", "uk_UA"),
    "greek": ("el_GR",),
    "arabic": ("ar_AA", "fa_IR"),
    "cjk": ("zh_CN", "ja_JP"),
}


def non_name_sentences(per_locale: int = 40, seed: int = 10) -> list[tuple[str, str]]:
    """(script, sentence) without names: the support sentences above and Faker's lorem text."""
    rng = random.Random(seed)
    rows = [(script, s) for script, sentences in SUPPORT_SENTENCES.items() for s in sentences]
    for script, locales in LOREM_LOCALES.items():
        for locale in locales:
            words = list(import_module(f"faker.providers.lorem.{locale}").Provider.word_list)
            joiner = "" if script == "cjk" else " "
            for _ in range(per_locale):
                sentence = joiner.join(rng.choice(words) for _ in range(rng.randint(5, 12)))
                if script != "cjk":
                    sentence = sentence[0].upper() + sentence[1:] + "."
                rows.append((script, sentence))
    return rows
