"""Everyday text in the languages and legacy code pages a document may come in: a sentence
and a paragraph of each (written for these tests), for ``tests/test_text_encodings.py``."""

from __future__ import annotations

# language -> (code pages, sentence, paragraph)
SAMPLES = {
    'pl': (('cp1250', 'iso8859_2'),
        'Spotkanie zarządu odbędzie się w piątek o godzinie 14:00 w sali konferencyjnej.',
        ('W minionym roku spółka zwiększyła przychody o 12 procent w porównaniu z '
         'rokiem poprzednim. Największy wzrost odnotowano w segmencie usług '
         'doradczych, gdzie pozyskaliśmy kilku nowych klientów z sektora '
         'energetycznego. Zarząd podkreśla, że wynik ten był możliwy dzięki '
         'zaangażowaniu pracowników oraz konsekwentnej realizacji strategii.')),
    'cs': (('cp1250', 'iso8859_2'),
        'Příští týden bude v Praze převážně slunečno, teploty vystoupí až na dvacet stupňů.',
        ('Zvolte vhodný program otočným voličem a stiskněte tlačítko Start. Během '
         'praní nelze dvířka otevřít; po skončení programu se zámek uvolní přibližně '
         'za dvě minuty. Pokud se na displeji objeví chybové hlášení, vyhledejte jeho '
         'význam v tabulce na konci této příručky.')),
    'hu': (('cp1250', 'iso8859_2'),
        'A könyvtár hétfőtől péntekig reggel nyolctól este hat óráig tart nyitva az olvasóknak.',
        ('A programok között szerepel vitorlázás, kerékpártúra, íjászat és kézműves '
         'foglalkozás. Esős idő esetén a gyerekek a közösségi házban '
         'társasjátékozhatnak, vagy filmet nézhetnek. Minden csoport mellett két '
         'tapasztalt felnőtt kísérő lesz, akik elsősegély-tanfolyamot végeztek.')),
    'ru': (('cp1251', 'koi8_r'),
        'Поезд прибывает на вокзал в семь часов утра, поэтому встречать нас не нужно.',
        ('После завершения установки перезагрузите компьютер. При первом запуске '
         'программа предложит создать учётную запись или войти в существующую. Все '
         'ваши настройки будут храниться на сервере, поэтому вы сможете пользоваться '
         'ими на любом устройстве.')),
    'el': (('iso8859_7', 'cp1253'),
        'Το μουσείο θα παραμείνει κλειστό την Κυριακή λόγω εργασιών συντήρησης του κτιρίου.',
        ('Κατά τη διάρκεια των εργασιών ενδέχεται να υπάρξουν διακοπές νερού, κυρίως '
         'τις πρωινές ώρες. Θα προσπαθήσουμε να ενημερώνουμε έγκαιρα για κάθε '
         'προγραμματισμένη διακοπή μέσω της ιστοσελίδας του δήμου και με ανακοινώσεις '
         'στις εισόδους των πολυκατοικιών.')),
    'tr': (('cp1254',),
        'Toplantı yarın sabah dokuzda başlayacak, lütfen raporlarınızı yanınızda getirin.',
        ('Ankette ayrıca mobil uygulamamızın kullanımı hakkında sorular yer aldı. '
         'Kullanıcıların yüzde altmışı uygulamayı düzenli olarak kullandığını, ancak '
         'ödeme adımının daha basit olması gerektiğini söyledi. Yazılım ekibimiz bu '
         'geri bildirimler doğrultusunda çalışmalara başladı.')),
    'fr': (('iso8859_15',),
        "Le cœur du problème : le prix a grimpé à 15 € et l'œuvre reste inachevée.",
        ("La séance s'est ouverte à dix-huit heures en présence de douze membres. Le "
         "trésorier a présenté le bilan financier de l'année : les recettes de la fête "
         "du village s'élèvent à 3 450 €, tandis que les dépenses ont atteint 2 980 €. "
         "L'excédent servira à financer le spectacle de fin d'année.")),
    'de': (('latin_1',),
        'Die Bäckerei öffnet am Sonntag erst um acht Uhr, weil der Ofen gewartet wird.',
        ('In die gelbe Tonne gehören Verpackungen aus Kunststoff, Metall und '
         'Verbundstoffen, zum Beispiel Joghurtbecher, Konservendosen und '
         'Getränkekartons. Bitte spülen Sie die Verpackungen nicht aus, sondern '
         'entleeren Sie sie nur gründlich. Papier und Pappe kommen in die blaue Tonne; '
         'große Kartons bitte zerkleinern.')),
    'es': (('latin_1',),
        'El señor Muñoz llegará mañana a las diez; ¿podrías reservar la sala pequeña?',
        ('Si no está satisfecho con su compra, puede devolver el producto en un plazo '
         'de treinta días a partir de la fecha de recepción. El artículo debe estar en '
         'su embalaje original, sin usar y con todas las etiquetas. Una vez recibida '
         'la devolución, le reembolsaremos el importe en el mismo método de pago que '
         'utilizó.')),
    'en': (('cp1252',),
        '“Don’t forget,” she said – the café closes at 5… so we’ll meet at 4.',
        ('We’ve rewritten the export module from scratch. Exports are now up to three '
         'times faster, and the “Save as…” dialog remembers your last folder. Large '
         'spreadsheets (over 100,000 rows) no longer freeze the interface while '
         'they’re written.')),
    'ja': (('shift_jis', 'euc_jp'),
        '明日の会議は午後三時から本社の大会議室で行います。',
        ('発表会では、製品の主な機能をご紹介するとともに、実際の操作を体験していただけるデ'
         'モンストレーションを行います。また、開発担当者による質疑応答の時間も設けておりま'
         'す。導入をご検討中のお客様には、個別相談の場もご用意いたします。')),
    'zh-Hans': (('gbk', 'gb18030'),
        '明天上午九点在三楼会议室召开项目进度讨论会，请大家准时参加。',
        ('根据公司发展需要，并结合夏季天气特点，经研究决定，自下月一日起调整公司办公时间。'
         '上午上班时间为八点半至十二点，下午上班时间为一点半至五点半。周六、周日休息，如遇'
         '国家法定节假日，按照国家有关规定执行。')),
    'zh-Hant': (('big5',),
        '本週六上午十點在圖書館舉辦親子閱讀活動，歡迎家長帶孩子參加。',
        ('本館開放時間為週二至週日上午九點至晚上九點，每週一及國定假日休館。讀者憑借閱證可'
         '借閱圖書、雜誌及影音資料，每人每次最多可借十本，借期為三週，期滿前可於網路上續借'
         '一次。')),
    'ko': (('euc_kr',),
        '내일 오전 열 시에 회의실에서 신제품 기획 회의가 열릴 예정입니다.',
        ('점검은 오전 아홉 시부터 오후 다섯 시까지 진행되며, 동별 '
         '일정은 각 동 현관 게시판에 게시하였습니다. 거동이 불편하신 '
         '분이나 무거운 짐을 옮겨야 하는 분은 관리사무소로 미리 연락해 '
         '주시면 도움을 드리겠습니다.')),
}
