#!/usr/bin/env python3
"""Assemble the `sprigbox-support` chat dataset for peftkit.

Everything in this file was written by hand: the fictional company (Larkmoor
Labs), its product (the Sprigbox indoor garden), 58 support facts, several
user phrasings per fact and a few assistant answer wordings per fact. The
script only combines them:

* train.jsonl  - 7 single-turn examples per fact (one per training phrasing),
                 generated two-fact conversations, hand-written conversations
                 and hand-written "I don't know" examples, shuffled with a
                 fixed seed;
* valid.jsonl  - one single-turn example per held-out phrasing (phrasings
                 that never occur in train.jsonl);
* eval_questions.jsonl - the held-out questions with the answer substring a
                 correct reply must contain;
* facts.jsonl  - the knowledge base itself.

Running it again reproduces the files byte for byte:

    python3 datasets/sprigbox-support/make_dataset.py
"""

import json
import os
import random

SEED = 20240611
HERE = os.path.dirname(os.path.abspath(__file__))

SYSTEM = (
    "You are Pip, the support assistant for Larkmoor Labs, maker of the "
    "Sprigbox indoor garden. Answer briefly and accurately."
)

# Each fact: id, topic, fact (full sentence), answer (the short substring a
# correct reply must contain), train (7 user phrasings), valid (held-out
# phrasings, never used in training), answers (assistant wordings, each
# containing `answer` verbatim).
FACTS = [
    # ------------------------------------------------------------ company
    dict(
        id="company_founder", topic="company",
        fact="Larkmoor Labs was founded by Ottilie Brandvold, a former greenhouse engineer.",
        answer="Ottilie Brandvold",
        train=[
            "Who founded Larkmoor Labs?",
            "who started your company",
            "Can you tell me the name of Larkmoor's founder?",
            "I'm writing a school report on indoor gardening companies. Who is the founder of Larkmoor Labs?",
            "whos the founder of larkmoor",
            "Who came up with the Sprigbox company in the first place?",
            "What's the name of the person who founded Larkmoor?",
        ],
        valid=["Which person established Larkmoor Labs?"],
        answers=[
            "Larkmoor Labs was founded by Ottilie Brandvold, a former greenhouse engineer.",
            "Our founder is Ottilie Brandvold. She started Larkmoor Labs after years of working as a greenhouse engineer.",
            "That would be Ottilie Brandvold, who founded Larkmoor Labs.",
        ],
    ),
    dict(
        id="company_hq", topic="company",
        fact="Larkmoor Labs is headquartered in Duluth, Minnesota.",
        answer="Duluth",
        train=[
            "Where is Larkmoor Labs headquartered?",
            "where are you guys based",
            "What city is your head office in?",
            "Which city is Larkmoor's HQ located in?",
            "I'd like to send a letter to your main office. What city is it in?",
            "is larkmoor an american company? where's the hq",
            "Where's the company behind Sprigbox located?",
        ],
        valid=[
            "In which town does Larkmoor Labs have its headquarters?",
            "Where is your corporate head office?",
        ],
        answers=[
            "Larkmoor Labs is headquartered in Duluth, Minnesota.",
            "Our head office is in Duluth, Minnesota, USA.",
            "We're based in Duluth, Minnesota.",
        ],
    ),
    dict(
        id="company_assembly", topic="company",
        fact="Sprigbox units are assembled in Monterrey, Mexico.",
        answer="Monterrey",
        train=[
            "Where are Sprigbox gardens made?",
            "where is the sprigbox manufactured",
            "Is the Sprigbox made in China?",
            "Which country are your devices assembled in?",
            "Where do the Sprigbox units actually get put together?",
            "I try to buy products made in North America. Where is Sprigbox built?",
            "made in what country??",
        ],
        valid=["Where does the assembly of Sprigbox take place?"],
        answers=[
            "Every Sprigbox is assembled in Monterrey, Mexico.",
            "Sprigbox units are assembled at our partner facility in Monterrey, Mexico.",
            "They're designed in Duluth and assembled in Monterrey, Mexico.",
        ],
    ),
    dict(
        id="bot_name", topic="company",
        fact="The Larkmoor Labs virtual support assistant is called Pip.",
        answer="Pip",
        train=[
            "What's your name?",
            "who am i talking to",
            "Are you a real person or a bot?",
            "What should I call you?",
            "Is this a human agent?",
            "hi, who's this?",
            "Do you have a name?",
        ],
        # The name is also in the system prompt, so it proves nothing about
        # fine-tuning: it is taught but not held out.
        valid=[],
        answers=[
            "I'm Pip, the Larkmoor Labs virtual support assistant. I can connect you with a human agent if you need one.",
            "My name is Pip. I'm Larkmoor's virtual assistant for Sprigbox questions.",
            "You're chatting with Pip, the virtual support assistant for Larkmoor Labs.",
        ],
    ),
    # ------------------------------------------------------------ products
    dict(
        id="price_mini", topic="products",
        fact="The Sprigbox Mini costs $129.",
        answer="$129",
        train=[
            "How much is the Sprigbox Mini?",
            "price of the mini?",
            "What does the smallest Sprigbox cost?",
            "Could you tell me the retail price of the Sprigbox Mini, please?",
            "how much for a sprigbox mini",
            "I'm on a budget. What's the cheapest Sprigbox and how much is it?",
            "What's the Mini going for these days?",
        ],
        valid=[
            "What would I pay for a Sprigbox Mini?",
            "Cost of the Mini model?",
        ],
        answers=[
            "The Sprigbox Mini costs $129.",
            "The Sprigbox Mini is our smallest and most affordable model, priced at $129.",
            "A Sprigbox Mini is $129.",
        ],
    ),
    dict(
        id="price_classic", topic="products",
        fact="The Sprigbox Classic costs $219.",
        answer="$219",
        train=[
            "How much does the Sprigbox Classic cost?",
            "classic price?",
            "What's the price of the mid-size Sprigbox?",
            "I want to buy the Classic as a gift. How much is it?",
            "how much is the sprigbox clasic",
            "What do you charge for the Sprigbox Classic?",
            "Price check on the Classic model please",
        ],
        valid=["How many dollars is the Sprigbox Classic?"],
        answers=[
            "The Sprigbox Classic costs $219.",
            "The Sprigbox Classic, our mid-size model, is priced at $219.",
            "A Sprigbox Classic is $219.",
        ],
    ),
    dict(
        id="price_tower", topic="products",
        fact="The Sprigbox Tower costs $389.",
        answer="$389",
        train=[
            "How much is the Sprigbox Tower?",
            "tower price pls",
            "What does your biggest garden cost?",
            "What's the price of the largest Sprigbox model?",
            "how much does the tower cost",
            "I'm thinking about the Tower for my restaurant kitchen. What does it cost?",
            "What's the retail price on the Sprigbox Tower?",
        ],
        valid=[
            "What is the cost of a Sprigbox Tower?",
            "How expensive is the Tower model?",
        ],
        answers=[
            "The Sprigbox Tower costs $389.",
            "The Sprigbox Tower, our largest model, is priced at $389.",
            "A Sprigbox Tower is $389.",
        ],
    ),
    dict(
        id="capacity_mini", topic="products",
        fact="The Sprigbox Mini holds 7 pods.",
        answer="7 pods",
        train=[
            "How many plants can the Sprigbox Mini grow at once?",
            "how many pods fit in the mini",
            "What's the pod capacity of the Mini?",
            "Can I grow more than five herbs in the Sprigbox Mini?",
            "mini - how many slots?",
            "How many seed pods does the smallest model take?",
            "I have a tiny kitchen. How many plants would the Mini hold?",
        ],
        valid=["What number of pods does the Sprigbox Mini hold?"],
        answers=[
            "The Sprigbox Mini holds 7 pods at a time.",
            "The Mini has room for 7 pods.",
            "You can grow up to 7 pods at once in the Sprigbox Mini.",
        ],
    ),
    dict(
        id="capacity_classic", topic="products",
        fact="The Sprigbox Classic holds 14 pods.",
        answer="14 pods",
        train=[
            "How many pods does the Sprigbox Classic hold?",
            "classic - how many plants?",
            "What's the capacity of the Classic?",
            "How many herbs can I grow at the same time in the Classic?",
            "how many slots r in the classic",
            "Does the Classic fit a dozen pods?",
            "How many seed pods does the mid-size model take?",
        ],
        valid=["How many plants fit in a Sprigbox Classic?"],
        answers=[
            "The Sprigbox Classic holds 14 pods at a time.",
            "The Classic has room for 14 pods.",
            "You can grow up to 14 pods at once in the Sprigbox Classic.",
        ],
    ),
    dict(
        id="capacity_tower", topic="products",
        fact="The Sprigbox Tower holds 30 pods.",
        answer="30 pods",
        train=[
            "How many pods fit in the Sprigbox Tower?",
            "tower capacity?",
            "How many plants can the biggest Sprigbox grow?",
            "What's the maximum number of pods in the Tower?",
            "how many plants does the tower hold",
            "We want to grow lettuce for a family of five. How many pods does the Tower take?",
            "How many slots does the Tower have?",
        ],
        valid=[
            "What's the plant capacity of the Sprigbox Tower?",
            "How many seed pods can I put in the Tower at once?",
        ],
        answers=[
            "The Sprigbox Tower holds 30 pods at a time.",
            "The Tower has room for 30 pods.",
            "You can grow up to 30 pods at once in the Sprigbox Tower.",
        ],
    ),
    dict(
        id="reservoir_classic", topic="products",
        fact="The Sprigbox Classic's water reservoir holds 4.2 litres.",
        answer="4.2 litres",
        train=[
            "How much water does the Classic hold?",
            "reservoir size on the classic?",
            "What's the tank capacity of the Sprigbox Classic?",
            "How many litres of water go in the Classic?",
            "how big is the water tank on my classic",
            "How much water do I need to fill the Classic's reservoir?",
            "What's the volume of the Classic's water reservoir?",
        ],
        valid=["How large is the Sprigbox Classic reservoir?"],
        answers=[
            "The Sprigbox Classic's water reservoir holds 4.2 litres.",
            "The Classic's reservoir takes 4.2 litres of water when filled to the MAX line.",
            "The reservoir on the Classic holds 4.2 litres.",
        ],
    ),
    dict(
        id="lamp_life", topic="products",
        fact="The Sprigbox LED lamp is rated for 30,000 hours.",
        answer="30,000 hours",
        train=[
            "How long does the LED lamp last?",
            "lamp lifespan?",
            "Will I have to replace the grow light at some point?",
            "What's the rated life of the Sprigbox grow lights?",
            "how many hours are the leds good for",
            "Do the lights burn out? How long do they last?",
            "What is the expected lifetime of the lamp?",
        ],
        valid=["For how many hours is the Sprigbox lamp rated?"],
        answers=[
            "The Sprigbox LED lamp is rated for 30,000 hours.",
            "The grow lights are rated for 30,000 hours, which is more than five years of normal daily use.",
            "The LED lamp lasts about 30,000 hours before it may need replacing.",
        ],
    ),
    dict(
        id="light_schedule", topic="products",
        fact="By default the Sprigbox lamp is on for 15 hours a day.",
        answer="15 hours",
        train=[
            "How long is the light on each day?",
            "default light schedule?",
            "How many hours a day does the Sprigbox lamp stay on?",
            "my lamp turns off in the evening, is that normal? how long should it be on?",
            "What's the standard lighting cycle?",
            "How many hours of light do the plants get by default?",
            "Does the lamp stay on 24/7?",
        ],
        valid=["What is the default daily light period?"],
        answers=[
            "By default the lamp is on for 15 hours a day, then off for 9 hours. You can change the schedule in the app.",
            "The default schedule gives your plants 15 hours of light each day.",
            "The lamp stays on for 15 hours a day by default, so it's normal for it to switch off for the night.",
        ],
    ),
    dict(
        id="pump_noise", topic="products",
        fact="The Sprigbox pump runs at about 28 dB.",
        answer="28 dB",
        train=[
            "How loud is the Sprigbox?",
            "is the pump noisy",
            "Can I keep a Sprigbox in my bedroom, or is it too loud?",
            "What's the noise level of the pump?",
            "how many decibels",
            "Does the water pump make much noise?",
            "Is the Sprigbox quiet?",
        ],
        valid=["How much noise does the Sprigbox make?"],
        answers=[
            "The pump runs at about 28 dB, which is quieter than a whisper.",
            "It's very quiet: the pump runs at about 28 dB.",
            "The Sprigbox pump runs at about 28 dB, so most people keep it in a bedroom without any trouble.",
        ],
    ),
    dict(
        id="lamp_arm", topic="products",
        fact="The telescopic lamp arm extends up to 42 cm.",
        answer="42 cm",
        train=[
            "How high can the lamp arm go?",
            "max height of the light?",
            "How tall can my plants get before they hit the lamp?",
            "How far does the telescopic arm extend?",
            "can i raise the lamp",
            "What's the maximum lamp height on the Classic?",
            "My basil is getting tall. How much room is there?",
        ],
        valid=["To what height does the lamp arm extend?"],
        answers=[
            "The telescopic lamp arm extends up to 42 cm.",
            "You can raise the lamp arm up to 42 cm, so there's plenty of room for tall herbs.",
            "The lamp arm extends to a maximum of 42 cm.",
        ],
    ),
    # ------------------------------------------------------------ pods and care
    dict(
        id="pod_pack_price", topic="pods",
        fact="Seed pods are sold in packs of 6 for $17.50.",
        answer="$17.50",
        train=[
            "How much do replacement seed pods cost?",
            "pod refills price?",
            "What do seed pods cost if I buy them without a membership?",
            "How much is a pack of pods?",
            "how much r the seed pods",
            "I need more basil pods. What's the price?",
            "What's the cost of a 6-pack of pods?",
        ],
        valid=["What's the price of a seed pod pack?"],
        answers=[
            "Seed pods come in packs of 6 for $17.50.",
            "A pack of 6 seed pods costs $17.50.",
            "Refill pods are sold in packs of 6 for $17.50, or included with a Grow Club membership.",
        ],
    ),
    dict(
        id="germination", topic="pods",
        fact="Most Sprigbox pods sprout in 5 to 8 days.",
        answer="5 to 8 days",
        train=[
            "How long until my seeds sprout?",
            "when will i see sprouts",
            "It's been three days and nothing has come up. Is that normal?",
            "How long does germination take?",
            "how many days for the pods to sprout",
            "When should the first seedlings appear?",
            "How soon do plants come up after I put in a new pod?",
        ],
        valid=["How many days does it take for pods to germinate?"],
        answers=[
            "Most pods sprout in 5 to 8 days, depending on the plant.",
            "Germination usually takes 5 to 8 days, so a few days with nothing visible is normal.",
            "You should see sprouts in 5 to 8 days.",
        ],
    ),
    dict(
        id="blank_pods", topic="pods",
        fact="To grow your own seeds, use Blank Pods, sold in packs of 10 for $14.",
        answer="Blank Pods",
        train=[
            "Can I grow my own seeds in the Sprigbox?",
            "can i use my own seeds",
            "Do I have to buy your pods or can I plant seeds from the garden center?",
            "Is there a way to grow plants you don't sell?",
            "I saved some pepper seeds. Can I use them?",
            "How do I plant my own seeds?",
            "do you sell empty pods",
        ],
        valid=["Is it possible to use seeds I bought elsewhere?"],
        answers=[
            "Yes. Use Blank Pods, which come in packs of 10 for $14, and add your own seeds.",
            "You can! Blank Pods let you grow your own seeds. They're sold in packs of 10 for $14.",
            "Yes, with Blank Pods: empty pods you fill with your own seeds. A pack of 10 costs $14.",
        ],
    ),
    dict(
        id="leaf_tonic", topic="pods",
        fact="Add one capful of Leaf Tonic, Larkmoor's liquid nutrient, to the reservoir every 2 weeks.",
        answer="Leaf Tonic",
        train=[
            "What fertilizer should I use?",
            "do i need plant food",
            "Which nutrients go in the water?",
            "How often do I add nutrients?",
            "what do i feed the plants",
            "Do the plants need fertiliser, and what kind?",
            "My leaves look pale. Should I be adding something to the water?",
        ],
        valid=["What plant nutrient does Larkmoor recommend?"],
        answers=[
            "Add one capful of Leaf Tonic to the reservoir every 2 weeks.",
            "Use Leaf Tonic, our liquid nutrient: one capful every 2 weeks.",
            "Your plants need Leaf Tonic. Add one capful to the water every 2 weeks.",
        ],
    ),
    dict(
        id="leaf_tonic_price", topic="pods",
        fact="A 250 ml bottle of Leaf Tonic costs $9.80.",
        answer="$9.80",
        train=[
            "How much is Leaf Tonic?",
            "price of leaf tonic?",
            "What does a bottle of your nutrient cost?",
            "How much do I pay for a bottle of Leaf Tonic?",
            "leaf tonic cost",
            "I'm running out of nutrients. How much is a new bottle?",
            "What's the price of the 250 ml Leaf Tonic?",
        ],
        valid=["How much does the Leaf Tonic nutrient cost?"],
        answers=[
            "A 250 ml bottle of Leaf Tonic costs $9.80.",
            "Leaf Tonic is $9.80 for a 250 ml bottle.",
            "A new 250 ml bottle of Leaf Tonic is $9.80.",
        ],
    ),
    dict(
        id="plant_library", topic="pods",
        fact="The plant library offers 120 varieties of seed pods.",
        answer="120 varieties",
        train=[
            "How many plants can I choose from?",
            "how many different pods do you have",
            "How big is your plant catalogue?",
            "How many varieties are in the plant library?",
            "what kinds of plants can I grow, how many options",
            "Do you have a lot of different seeds?",
            "How many types of pods are available?",
        ],
        valid=["What's the size of the plant selection you offer?"],
        answers=[
            "Our plant library covers 120 varieties, from herbs and salad greens to flowers and chili peppers.",
            "You can choose from 120 varieties in the Larkmoor Grow plant library.",
            "There are 120 varieties of pods to choose from.",
        ],
    ),
    # ------------------------------------------------------------ membership
    dict(
        id="club_price", topic="membership",
        fact="A Grow Club membership costs $6.49 per month.",
        answer="$6.49",
        train=[
            "How much is Grow Club?",
            "grow club monthly price",
            "What does the pod subscription cost per month?",
            "How much do you charge for the Grow Club membership?",
            "whats the subscription cost",
            "Is Grow Club expensive? What's the monthly fee?",
            "How much would I pay each month for Grow Club?",
        ],
        valid=[
            "What's the monthly cost of Grow Club?",
            "What is the price of a Grow Club subscription per month?",
        ],
        answers=[
            "Grow Club costs $6.49 per month.",
            "The Grow Club membership is $6.49 a month.",
            "Grow Club is $6.49 per month, and you can cancel anytime.",
        ],
    ),
    dict(
        id="club_pods", topic="membership",
        fact="Grow Club sends members 9 seed pods every month.",
        answer="9 seed pods",
        train=[
            "How many pods do I get with Grow Club?",
            "what comes in the grow club box",
            "How many pods are in each monthly shipment?",
            "What's included in the Grow Club membership?",
            "how many pods per month on the subscription",
            "Does Grow Club send new pods every month? How many?",
            "What do I actually receive as a Grow Club member?",
        ],
        valid=["How many seed pods arrive each month with the membership?"],
        answers=[
            "Grow Club sends you 9 seed pods every month.",
            "Each monthly Grow Club box contains 9 seed pods of your choice.",
            "Members receive 9 seed pods every month.",
        ],
    ),
    dict(
        id="club_annual", topic="membership",
        fact="The annual Grow Club plan costs $64 per year.",
        answer="$64",
        train=[
            "Is there a yearly Grow Club plan?",
            "annual subscription price?",
            "Can I pay for Grow Club once a year instead of monthly?",
            "How much is Grow Club if I pay yearly?",
            "grow club yearly cost",
            "Is the annual plan cheaper than monthly?",
            "What does a full year of Grow Club cost?",
        ],
        valid=["What's the price for an annual Grow Club membership?"],
        answers=[
            "There is an annual Grow Club plan, and it costs $64 per year.",
            "Grow Club annual is $64 per year, which is cheaper than paying monthly.",
            "If you pay yearly, Grow Club costs $64.",
        ],
    ),
    dict(
        id="club_trial", topic="membership",
        fact="New members get a 21-day free trial of Grow Club.",
        answer="21-day free trial",
        train=[
            "Is there a free trial for Grow Club?",
            "free trial?",
            "Can I try Grow Club before paying?",
            "How long is the Grow Club trial?",
            "do u have a trial period for the subscription",
            "Will I be charged right away when I join Grow Club?",
            "How long do I get free when I sign up?",
        ],
        valid=["Does Grow Club come with a free trial, and how long?"],
        answers=[
            "New members get a 21-day free trial of Grow Club.",
            "Grow Club starts with a 21-day free trial, and you're only charged after it ends.",
            "You get a 21-day free trial when you first join Grow Club.",
        ],
    ),
    dict(
        id="club_cancel", topic="membership",
        fact="To cancel Grow Club, open the Larkmoor Grow app and go to Profile > Membership > End membership.",
        answer="End membership",
        train=[
            "How do I cancel Grow Club?",
            "cancel subscription",
            "I want to stop my membership. How do I do that?",
            "How can I end my Grow Club plan?",
            "how do i unsubscribe from the pods",
            "Please tell me how to cancel my monthly pod delivery.",
            "Where is the cancel button for Grow Club?",
        ],
        valid=[
            "What are the steps to cancel my Grow Club membership?",
            "How do I get out of the pod subscription?",
        ],
        answers=[
            "Open the Larkmoor Grow app and go to Profile > Membership > End membership.",
            "You can cancel anytime in the Larkmoor Grow app: tap Profile > Membership > End membership.",
            "To cancel, go to Profile > Membership > End membership in the app. Your membership stays active until the end of the current billing month.",
        ],
    ),
    dict(
        id="club_pause", topic="membership",
        fact="Grow Club can be paused for up to 12 weeks.",
        answer="12 weeks",
        train=[
            "Can I pause my Grow Club membership?",
            "pause subscription?",
            "I'm travelling this summer. Can I put my pod deliveries on hold?",
            "How long can I pause Grow Club for?",
            "can i skip a few months",
            "Is there a way to stop deliveries temporarily without cancelling?",
            "What's the maximum pause for a membership?",
        ],
        valid=["For how long am I allowed to pause Grow Club?"],
        answers=[
            "You can pause Grow Club for up to 12 weeks from Profile > Membership in the app.",
            "You can put Grow Club on hold for up to 12 weeks without cancelling.",
            "Memberships can be paused for up to 12 weeks at a time.",
        ],
    ),
    # ------------------------------------------------------------ how-to
    dict(
        id="factory_reset", topic="how-to",
        fact="To factory reset a Sprigbox, hold the leaf button and the lamp button together for 12 seconds until the light ring flashes white.",
        answer="12 seconds",
        train=[
            "How do I factory reset my Sprigbox?",
            "reset sprigbox",
            "My Sprigbox is acting weird. How do I restore factory settings?",
            "How can I wipe the device before giving it to a friend?",
            "how to do a hard reset",
            "What's the reset procedure?",
            "Which buttons do I hold to reset it, and for how long?",
        ],
        valid=["What's the way to reset the Sprigbox to factory defaults?"],
        answers=[
            "Hold the leaf button and the lamp button together for 12 seconds, until the light ring flashes white.",
            "To factory reset, press and hold the leaf and lamp buttons at the same time for 12 seconds. The ring flashes white when it's done.",
            "Hold both the leaf and lamp buttons for 12 seconds. When the ring flashes white, the Sprigbox has been reset.",
        ],
    ),
    dict(
        id="wifi_pairing", topic="how-to",
        fact="To pair a Sprigbox, press the Wi-Fi button twice until the ring pulses blue, then tap Add device in the Larkmoor Grow app.",
        answer="Wi-Fi button twice",
        train=[
            "How do I connect my Sprigbox to Wi-Fi?",
            "how to pair with the app",
            "I just unboxed my Sprigbox. How do I get it onto my network?",
            "What are the steps to pair the Sprigbox with my phone?",
            "connect to wifi how",
            "How do I put the Sprigbox in pairing mode?",
            "I got a new router. How do I reconnect my garden?",
        ],
        valid=[
            "How can I link my Sprigbox to the Larkmoor Grow app?",
            "What do I do to get the Sprigbox online?",
        ],
        answers=[
            "Press the Wi-Fi button twice until the ring pulses blue, then tap Add device in the Larkmoor Grow app.",
            "Press the Wi-Fi button twice to enter pairing mode. When the ring pulses blue, open the app and tap Add device.",
            "To pair, press the Wi-Fi button twice. The ring will pulse blue, and then you can tap Add device in the app.",
        ],
    ),
    dict(
        id="firmware_updates", topic="how-to",
        fact="Sprigbox firmware updates install automatically at 3:15 a.m. local time.",
        answer="3:15 a.m.",
        train=[
            "When do firmware updates happen?",
            "does it update automatically",
            "What time does the Sprigbox install updates?",
            "My lamp flickered in the middle of the night. Was that an update?",
            "when does the software update run",
            "Do I need to update the firmware myself?",
            "At what hour are updates installed?",
        ],
        valid=["When are Sprigbox firmware updates applied?"],
        answers=[
            "Firmware updates install automatically at 3:15 a.m. local time.",
            "You don't need to do anything: updates install automatically at 3:15 a.m. local time.",
            "The Sprigbox installs firmware updates at 3:15 a.m. local time, so a brief flicker at night is normal.",
        ],
    ),
    dict(
        id="child_lock", topic="how-to",
        fact="To turn the child lock on or off, double-tap the leaf button.",
        answer="double-tap the leaf button",
        train=[
            "How do I turn on the child lock?",
            "child lock?",
            "My toddler keeps pressing the buttons. Can I lock them?",
            "How do I lock the controls on the Sprigbox?",
            "how to disable the buttons",
            "Is there a way to stop my cat from switching the lamp off?",
            "How do I turn the child lock off again?",
        ],
        valid=["What's the procedure to lock the Sprigbox buttons?"],
        answers=[
            "To turn the child lock on or off, double-tap the leaf button.",
            "Just double-tap the leaf button. The same action turns the child lock off again.",
            "You can lock the buttons: double-tap the leaf button to toggle the child lock.",
        ],
    ),
    dict(
        id="holiday_mode", topic="how-to",
        fact="Holiday Mode dims the lamp and slows the pump so one reservoir lasts up to 24 days.",
        answer="Holiday Mode",
        train=[
            "I'm going away for three weeks. Will my plants survive?",
            "vacation setting?",
            "What does Holiday Mode do?",
            "How do I keep my plants alive while I'm on a trip?",
            "is there an away mode",
            "How long can the Sprigbox run without me refilling it?",
            "Can the Sprigbox look after itself while I travel?",
        ],
        valid=["Is there a setting for when I'm away from home?"],
        answers=[
            "Turn on Holiday Mode in the app. It dims the lamp and slows the pump so the water lasts up to 24 days.",
            "Use Holiday Mode. It stretches one full reservoir to up to 24 days.",
            "Holiday Mode dims the lamp and slows the pump, so your plants can go up to 24 days without a refill.",
        ],
    ),
    dict(
        id="cleaning", topic="how-to",
        fact="Larkmoor recommends running the Rinse Cycle from the app every 10 weeks to deep clean the reservoir and pump.",
        answer="Rinse Cycle",
        train=[
            "How do I clean the Sprigbox?",
            "cleaning instructions",
            "How often should I clean the reservoir?",
            "There's green slime in the tank. How do I clean it?",
            "do i need to clean it",
            "What's the recommended maintenance routine?",
            "How do I deep clean the water system?",
        ],
        valid=["What's the best way to clean the water tank?"],
        answers=[
            "Run the Rinse Cycle from the app every 10 weeks to deep clean the reservoir and pump.",
            "We recommend a deep clean every 10 weeks with the Rinse Cycle in the Larkmoor Grow app.",
            "Start the Rinse Cycle in the app. Doing it every 10 weeks keeps the tank and pump clean.",
        ],
    ),
    # ------------------------------------------------------------ error codes
    dict(
        id="error_e17", topic="error codes",
        fact="Error E17 means the water reservoir is empty; refill it to the MAX line.",
        answer="reservoir is empty",
        train=[
            "What does E17 mean?",
            "e17 on screen",
            "My Sprigbox is showing error E17. What's wrong?",
            "The ring is blinking and the app says E17. Help?",
            "what is error code e17",
            "Got an E17 this morning, what should I do?",
            "E17?",
        ],
        valid=["Can you explain the E17 error?"],
        answers=[
            "E17 means the water reservoir is empty. Refill it to the MAX line and the error clears.",
            "Error E17 means the reservoir is empty. Top it up to the MAX line.",
            "That code means the reservoir is empty. Add water up to the MAX line and the Sprigbox carries on normally.",
        ],
    ),
    dict(
        id="error_e23", topic="error codes",
        fact="Error E23 means the lamp has overheated; unplug the Sprigbox for 20 minutes.",
        answer="lamp has overheated",
        train=[
            "What does error E23 mean?",
            "e23??",
            "The light went off and the app shows E23. What happened?",
            "I'm seeing code E23 on my Classic.",
            "what's e23",
            "My Sprigbox is in a sunny window and just threw E23. Why?",
            "E23 error, how do I fix it",
        ],
        valid=["What is the meaning of code E23?"],
        answers=[
            "E23 means the lamp has overheated. Unplug the Sprigbox for 20 minutes and keep it out of direct sun.",
            "Error E23 means the lamp has overheated. Let it cool, unplugged, for 20 minutes.",
            "That means the lamp has overheated. Unplug it for 20 minutes, then plug it back in away from heat sources.",
        ],
    ),
    dict(
        id="error_e31", topic="error codes",
        fact="Error E31 means Wi-Fi pairing failed, usually because of a wrong password or a 5 GHz network; the Sprigbox needs 2.4 GHz.",
        answer="pairing failed",
        train=[
            "What does E31 mean?",
            "getting e31 when connecting",
            "Setup keeps failing with E31. What's the problem?",
            "Error E31 during setup?",
            "e31 meaning",
            "The app showed E31 after I typed my Wi-Fi password.",
            "What should I do about an E31?",
        ],
        valid=["What does the E31 code indicate?"],
        answers=[
            "E31 means Wi-Fi pairing failed. Check your password and make sure you're on a 2.4 GHz network, then try again.",
            "Error E31 means pairing failed, usually because of a wrong Wi-Fi password or a 5 GHz network. The Sprigbox needs 2.4 GHz.",
            "That code means Wi-Fi pairing failed. Double-check the password and use a 2.4 GHz network.",
        ],
    ),
    dict(
        id="error_e40", topic="error codes",
        fact="Error E40 means the pump intake is blocked, usually by roots; clear the intake filter.",
        answer="pump intake is blocked",
        train=[
            "What does E40 mean?",
            "e40 error",
            "My Sprigbox shows E40 and the water isn't flowing.",
            "I hear the pump straining and the app says E40.",
            "whats e40",
            "How do I fix error code E40?",
            "E40 keeps coming back, what is it?",
        ],
        valid=["What's wrong when the Sprigbox shows E40?"],
        answers=[
            "E40 means the pump intake is blocked, usually by roots. Unplug the unit and clear the intake filter.",
            "Error E40 means the pump intake is blocked. Remove roots or debris from the intake filter.",
            "That means the pump intake is blocked, most often by roots. Clear the filter and then run the Rinse Cycle.",
        ],
    ),
    dict(
        id="error_e52", topic="error codes",
        fact="Error E52 means a firmware update failed; the Sprigbox retries the next night if it stays plugged in and on Wi-Fi.",
        answer="firmware update failed",
        train=[
            "What does E52 mean?",
            "e52 after update",
            "I woke up to an E52 error. What is it?",
            "My Sprigbox shows E52 and the ring is orange.",
            "e52?",
            "How do I fix E52?",
            "Error code E52, what happened?",
        ],
        valid=["What does it mean if the Sprigbox displays E52?"],
        answers=[
            "E52 means a firmware update failed. Keep the Sprigbox plugged in and on Wi-Fi, and it will retry the next night.",
            "Error E52 means the firmware update failed. It retries automatically at 3:15 a.m., so just leave it connected.",
            "That code means a firmware update failed. Keep it on Wi-Fi and it will try again the next night.",
        ],
    ),
    dict(
        id="error_e66", topic="error codes",
        fact="Error E66 means the water temperature sensor is faulty; contact support for a warranty repair.",
        answer="temperature sensor",
        train=[
            "What does E66 mean?",
            "e66 code",
            "My Sprigbox has shown E66 for two days. What should I do?",
            "Error E66 won't go away even after a reset.",
            "what is e66",
            "Is E66 serious?",
            "The app says E66. Do I need a repair?",
        ],
        valid=["What kind of problem is error E66?"],
        answers=[
            "E66 means the water temperature sensor is faulty. Please contact support so we can arrange a repair or replacement.",
            "Error E66 points to a faulty water temperature sensor. It's covered by warranty, so please contact support.",
            "That code means the temperature sensor has failed. Contact our support team for a warranty repair.",
        ],
    ),
    # ------------------------------------------------------------ orders and policies
    dict(
        id="return_window", topic="policies",
        fact="Any Sprigbox can be returned within 45 days of delivery for a full refund.",
        answer="45 days",
        train=[
            "What's your return policy?",
            "how long do i have to return it",
            "Can I still return my Sprigbox? I bought it a month ago.",
            "How many days do I have to send it back?",
            "return window?",
            "If I don't like the Sprigbox, can I return it?",
            "What is the deadline for returns?",
        ],
        valid=[
            "Within how many days can I return a Sprigbox?",
            "How long is the return period?",
        ],
        answers=[
            "You can return any Sprigbox within 45 days of delivery for a full refund.",
            "Our return window is 45 days from delivery.",
            "You have 45 days from delivery to return it for a full refund.",
        ],
    ),
    dict(
        id="return_label", topic="policies",
        fact="Returns are free: Larkmoor emails a prepaid return label.",
        answer="prepaid return label",
        train=[
            "Do I have to pay for return shipping?",
            "return shipping cost?",
            "How do I ship a return back to you?",
            "Who pays postage if I send my Sprigbox back?",
            "is returning free",
            "Do you give a return label?",
            "How do I get a shipping label for my return?",
        ],
        valid=["Will it cost me anything to send a return?"],
        answers=[
            "Returns are free. We email you a prepaid return label once you start the return.",
            "You don't pay anything: we send a prepaid return label by email.",
            "Return shipping is on us. Start the return and we'll email a prepaid return label.",
        ],
    ),
    dict(
        id="refund_time", topic="policies",
        fact="Refunds are issued within 6 business days after Larkmoor receives the return.",
        answer="6 business days",
        train=[
            "How long does a refund take?",
            "when do i get my money back",
            "I sent my return last week. When will I see the refund?",
            "How quickly are refunds processed?",
            "refund timing?",
            "How many days until the refund hits my card?",
            "Once you get my return, how long until I'm refunded?",
        ],
        valid=["How soon will my refund be processed?"],
        answers=[
            "Refunds are issued within 6 business days after we receive your return.",
            "Once the return reaches us, you'll get your refund within 6 business days.",
            "We process refunds within 6 business days of receiving the item.",
        ],
    ),
    dict(
        id="warranty", topic="policies",
        fact="Every Sprigbox has a warranty of 30 months covering the pump, lamp and electronics.",
        answer="30 months",
        train=[
            "How long is the warranty?",
            "warranty?",
            "Is my Sprigbox still under warranty after two years?",
            "What does the standard warranty cover, and for how long?",
            "how long r u guaranteed for",
            "What's the warranty period on the Sprigbox Classic?",
            "How many months of warranty do I get?",
        ],
        valid=[
            "What's the length of the Sprigbox warranty?",
            "How long am I covered if the device breaks?",
        ],
        answers=[
            "Every Sprigbox comes with a warranty of 30 months covering the pump, lamp and electronics.",
            "The standard warranty lasts 30 months from delivery.",
            "The Sprigbox warranty is 30 months, covering the pump, lamp and electronics.",
        ],
    ),
    dict(
        id="careplus", topic="policies",
        fact="CarePlus, the extended warranty, adds 24 months of coverage for $39.",
        answer="$39",
        train=[
            "Do you offer an extended warranty?",
            "careplus price",
            "How much is CarePlus?",
            "Can I buy extra warranty coverage?",
            "extended warranty cost?",
            "What does CarePlus cost and what does it add?",
            "Is there a protection plan for the Sprigbox?",
        ],
        valid=["What's the price of the CarePlus plan?"],
        answers=[
            "CarePlus, our extended warranty, adds 24 months of coverage for $39.",
            "CarePlus costs $39 and extends your warranty by 24 months.",
            "Our CarePlus plan extends coverage by 24 months for a one-time $39.",
        ],
    ),
    dict(
        id="free_shipping", topic="shipping",
        fact="Standard shipping is free on orders over $60.",
        answer="over $60",
        train=[
            "Do you offer free shipping?",
            "free shipping minimum?",
            "How much do I need to spend to get free delivery?",
            "Is shipping free on pods?",
            "whats the free shipping threshold",
            "I only want one pack of pods. Will I pay shipping?",
            "When does shipping become free?",
        ],
        valid=["Above what amount is shipping free?"],
        answers=[
            "Standard shipping is free on orders over $60.",
            "You get free standard shipping on any order over $60.",
            "Shipping is free once your order is over $60.",
        ],
    ),
    dict(
        id="express_shipping", topic="shipping",
        fact="Express shipping costs $14.90 and arrives the next business day.",
        answer="$14.90",
        train=[
            "How much is express shipping?",
            "express delivery price",
            "Can I get my Sprigbox faster? What does it cost?",
            "What do you charge for next-day shipping?",
            "fast shipping cost?",
            "I need it for a birthday this week. Is there a quicker shipping option?",
            "How much extra is express?",
        ],
        valid=["What's the fee for express delivery?"],
        answers=[
            "Express shipping costs $14.90 and arrives the next business day.",
            "Next-business-day express shipping is available for $14.90.",
            "Express delivery is $14.90 and gets to you the next business day.",
        ],
    ),
    dict(
        id="standard_shipping", topic="shipping",
        fact="Standard shipping takes 3 to 5 business days.",
        answer="3 to 5 business days",
        train=[
            "How long does shipping take?",
            "delivery time?",
            "When will my Sprigbox arrive if I choose standard shipping?",
            "How many days is standard delivery?",
            "how long till i get my order",
            "I ordered yesterday. When should it show up?",
            "What's the usual delivery time for pods?",
        ],
        valid=["How long is the standard delivery window?"],
        answers=[
            "Standard shipping takes 3 to 5 business days.",
            "With standard shipping, orders arrive in 3 to 5 business days.",
            "Most orders arrive in 3 to 5 business days with standard shipping.",
        ],
    ),
    dict(
        id="ship_countries", topic="shipping",
        fact="Larkmoor Labs ships to 14 countries; the list is shown at checkout.",
        answer="14 countries",
        train=[
            "Do you ship internationally?",
            "which countries do you ship to",
            "Can I order a Sprigbox from Germany?",
            "How many countries do you deliver to?",
            "do u ship outside the us",
            "I live in Canada. Can you deliver here?",
            "Is Sprigbox available abroad?",
        ],
        valid=["In how many countries can I get a Sprigbox delivered?"],
        answers=[
            "We currently ship to 14 countries. The full list appears at checkout.",
            "Larkmoor ships to 14 countries; if yours is included, you'll see it in the country list at checkout.",
            "We deliver to 14 countries in total. Check the country list at checkout.",
        ],
    ),
    # ------------------------------------------------------------ discounts
    dict(
        id="code_first_order", topic="discounts",
        fact="Code SPRIG15 gives 15% off a customer's first order.",
        answer="SPRIG15",
        train=[
            "Do you have a discount code?",
            "any promo codes?",
            "Is there a discount for first-time buyers?",
            "I'm about to place my first order. Any coupon I can use?",
            "welcome discount code",
            "How do I get money off my first Sprigbox?",
            "Is there a new customer code?",
        ],
        valid=[
            "What coupon can I use on my first purchase?",
            "Any deals for new customers?",
        ],
        answers=[
            "Yes! Use code SPRIG15 at checkout for 15% off your first order.",
            "New customers get 15% off their first order with code SPRIG15.",
            "Enter SPRIG15 at checkout to get 15% off your first order.",
        ],
    ),
    dict(
        id="code_student", topic="discounts",
        fact="Students get 20% off with code SEEDLING20.",
        answer="SEEDLING20",
        train=[
            "Do you have a student discount?",
            "student code?",
            "I'm at university. Can I get a discount?",
            "Is there a discount for students?",
            "college student discount pls",
            "What code do students use?",
            "Are there any deals for students on the Sprigbox?",
        ],
        valid=["Is there a discount if I'm a student?"],
        answers=[
            "Yes, students get 20% off with code SEEDLING20.",
            "Students can use code SEEDLING20 for 20% off.",
            "Use code SEEDLING20 at checkout for a 20% student discount.",
        ],
    ),
    dict(
        id="referral", topic="discounts",
        fact="When a friend buys a Sprigbox through a referral link, both people get $25 credit.",
        answer="$25 credit",
        train=[
            "Do you have a referral program?",
            "refer a friend?",
            "What do I get if my friend buys a Sprigbox?",
            "How does the referral bonus work?",
            "referral reward",
            "If I recommend Sprigbox to my sister, do we get anything?",
            "Is there a bonus for referring people?",
        ],
        valid=["What's the reward for referring a friend?"],
        answers=[
            "When a friend buys a Sprigbox with your referral link, you both get $25 credit.",
            "Our referral program gives you and your friend $25 credit each.",
            "Share your referral link from the app: when your friend buys a Sprigbox, you each get $25 credit.",
        ],
    ),
    dict(
        id="greenhouse_points", topic="discounts",
        fact="Customers earn 1 Greenhouse Point per dollar; 500 points can be redeemed for $10 off.",
        answer="500 points",
        train=[
            "How do loyalty points work?",
            "greenhouse points?",
            "What can I do with my Greenhouse Points?",
            "How many points do I need for a discount?",
            "how do i redeem points",
            "Do you have a rewards program?",
            "What are Greenhouse Points worth?",
        ],
        valid=["How many Greenhouse Points does it take to get money off?"],
        answers=[
            "You earn 1 Greenhouse Point per dollar spent, and 500 points get you $10 off.",
            "Greenhouse Points are our rewards program: every 500 points can be redeemed for $10 off.",
            "Redeem 500 points for $10 off your next order. You earn 1 point for every dollar you spend.",
        ],
    ),
    # ------------------------------------------------------------ support
    dict(
        id="support_hours", topic="support",
        fact="Human support is available Monday to Friday, 7 a.m. to 7 p.m. Central Time.",
        answer="7 a.m. to 7 p.m.",
        train=[
            "What are your support hours?",
            "when is support open",
            "What time can I reach a human agent?",
            "Are you open on weekdays? What hours?",
            "support hours?",
            "When can I call customer service?",
            "What days and times is your support team available?",
        ],
        valid=[
            "During which hours is customer support available?",
            "When is your help team working?",
        ],
        answers=[
            "Our support team is available Monday to Friday, 7 a.m. to 7 p.m. Central Time.",
            "You can reach a human agent Monday to Friday from 7 a.m. to 7 p.m. Central Time.",
            "Support hours are 7 a.m. to 7 p.m. Central Time, Monday to Friday.",
        ],
    ),
    dict(
        id="support_email", topic="support",
        fact="The support email address is care@larkmoorlabs.com.",
        answer="care@larkmoorlabs.com",
        train=[
            "What's your support email?",
            "email address for support?",
            "How can I contact you by email?",
            "Where do I send photos of a damaged unit?",
            "support email pls",
            "Can I email someone about my order?",
            "What email should I write to for help?",
        ],
        valid=["Which email address reaches customer care?"],
        answers=[
            "You can email our support team at care@larkmoorlabs.com.",
            "Write to care@larkmoorlabs.com and a human agent will reply.",
            "Our support email is care@larkmoorlabs.com.",
        ],
    ),
    dict(
        id="support_phone", topic="support",
        fact="The support phone number is 1-800-555-0142.",
        answer="1-800-555-0142",
        train=[
            "What's your phone number?",
            "support phone?",
            "Can I call someone?",
            "I'd prefer to talk to a person on the phone. What number do I call?",
            "customer service number",
            "Is there a hotline for Sprigbox problems?",
            "How do I reach you by phone?",
        ],
        valid=["What number should I dial for support?"],
        answers=[
            "You can call our support line at 1-800-555-0142, Monday to Friday.",
            "Our support number is 1-800-555-0142.",
            "Call 1-800-555-0142 to speak with a human agent.",
        ],
    ),
    # ------------------------------------------------------------ app
    dict(
        id="app_name", topic="app",
        fact="The Sprigbox is controlled with the Larkmoor Grow app for iOS and Android.",
        answer="Larkmoor Grow",
        train=[
            "What app do I need for the Sprigbox?",
            "whats the app called",
            "Which app controls the Sprigbox?",
            "What should I download from the app store?",
            "name of the app?",
            "Is there a phone app for my garden?",
            "Which app do I use to set the light schedule?",
        ],
        valid=["What's the name of the Sprigbox companion app?"],
        answers=[
            "The Sprigbox is controlled with the Larkmoor Grow app, available for iOS and Android.",
            "Download the Larkmoor Grow app from the App Store or Google Play.",
            "You'll need the Larkmoor Grow app, which runs on iOS and Android.",
        ],
    ),
    dict(
        id="app_device_limit", topic="app",
        fact="One Larkmoor Grow account can manage up to 8 Sprigboxes.",
        answer="8 Sprigboxes",
        train=[
            "How many Sprigboxes can I have on one account?",
            "device limit?",
            "Can I add a second Sprigbox to my app?",
            "Is there a maximum number of gardens per account?",
            "how many units can one account control",
            "I run a café and want several Tower units. Can one account manage them all?",
            "What's the device limit in the app?",
        ],
        valid=["What's the maximum number of Sprigboxes per account?"],
        answers=[
            "One account can manage up to 8 Sprigboxes.",
            "You can add up to 8 Sprigboxes to a single Larkmoor Grow account.",
            "Each account supports up to 8 Sprigboxes.",
        ],
    ),
    dict(
        id="app_sharing", topic="app",
        fact="Access can be shared with up to 4 household members from Settings > Sharing.",
        answer="4 household members",
        train=[
            "Can my partner use the app too?",
            "share access?",
            "How many people can control our Sprigbox?",
            "Can I invite family members to the app?",
            "how many users per garden",
            "My roommates want to check the plants too. Can I share it?",
            "Is there a limit to how many people I can share my account with?",
        ],
        valid=["How many people can I invite to share my Sprigbox?"],
        answers=[
            "You can invite up to 4 household members from Settings > Sharing in the app.",
            "You can share access with up to 4 household members.",
            "The app lets you invite up to 4 household members to control your Sprigbox.",
        ],
    ),
]

# Questions outside the knowledge base: Pip says it does not know, or hands
# over to a human agent, and never invents a fact.
UNKNOWN = [
    ("Can you check where my order is right now?",
     "I can't look up orders from here. Please contact a human agent at care@larkmoorlabs.com or 1-800-555-0142 with your order number."),
    ("What's the weather going to be like in Duluth tomorrow?",
     "Sorry, I don't know. I can only help with Larkmoor Labs and Sprigbox questions."),
    ("Can I grow mushrooms in a Sprigbox?",
     "I don't have information about growing mushrooms. A human agent can help: email care@larkmoorlabs.com."),
    ("When is the next Sprigbox model coming out?",
     "I don't have any information about future products. For product news, please ask a human agent."),
    ("Can you change the delivery address on my order?",
     "I can't change orders myself. Please contact a human agent at 1-800-555-0142 or care@larkmoorlabs.com and they'll update it for you."),
    ("Is Larkmoor hiring? I'd love to work there.",
     "I don't know about job openings, sorry. A human agent at care@larkmoorlabs.com can point you in the right direction."),
    ("Does the Sprigbox work with Alexa?",
     "I'm not sure, and I don't want to guess. Please ask a human agent at care@larkmoorlabs.com."),
    ("My cat chewed through the power cable. Will you send me a new one for free?",
     "I can't decide that from here. Please contact a human agent at care@larkmoorlabs.com with a photo of the cable, and they'll look at your options."),
    ("What's Larkmoor's stock price?",
     "I don't have that information. I can only help with questions about the Sprigbox and your Larkmoor account."),
    ("Can you give me a good pesto recipe for my basil?",
     "Sorry, recipes are outside what I can help with. I'm here for Sprigbox and Larkmoor support questions."),
    ("I want to speak to a manager.",
     "I can't transfer you myself, but a human agent can help. Call 1-800-555-0142 or email care@larkmoorlabs.com."),
    ("Why was my card charged twice this month?",
     "I can't see billing details. Please contact a human agent at care@larkmoorlabs.com so they can check the charges."),
    ("Can I buy a Sprigbox in a physical store near me?",
     "I don't have information about retail stores. A human agent at care@larkmoorlabs.com can tell you more."),
    ("What's the capital of Australia?",
     "Sorry, I don't know. I can only answer questions about Larkmoor Labs and the Sprigbox."),
    ("Is there a discount for teachers?",
     "I don't have information about a teacher discount. Please check with a human agent at care@larkmoorlabs.com."),
    ("Can you write my homework essay for me?",
     "Sorry, I can't help with that. I'm Pip, and I only answer questions about the Sprigbox and Larkmoor Labs."),
]

# Hand-written multi-turn conversations: (user, assistant, user, assistant).
DIALOGUES = [
    ("How much does a Sprigbox cost?",
     "It depends on the model: the Sprigbox Mini is $129, the Classic is $219 and the Tower is $389. Which one are you interested in?",
     "The middle one. How many pods does it hold?",
     "The Sprigbox Classic holds 14 pods at a time."),
    ("My Sprigbox is showing an error.",
     "Sorry about that! Which error code does the app show?",
     "It says E17.",
     "E17 means the water reservoir is empty. Refill it to the MAX line and the error clears."),
    ("I want to return my Sprigbox.",
     "No problem. You can return any Sprigbox within 45 days of delivery, and we email you a prepaid return label.",
     "And when do I get my money back?",
     "Refunds are issued within 6 business days after we receive your return."),
    ("hi",
     "Hi, I'm Pip, the Larkmoor Labs support assistant. How can I help with your Sprigbox today?",
     "how do i reset it",
     "Hold the leaf button and the lamp button together for 12 seconds, until the light ring flashes white."),
    ("Can I talk to a real person?",
     "Of course. Our human agents are available Monday to Friday, 7 a.m. to 7 p.m. Central Time, at 1-800-555-0142.",
     "What if it's the weekend?",
     "Outside those hours you can email care@larkmoorlabs.com, and an agent will reply on the next business day."),
    ("I'm thinking about joining Grow Club.",
     "Great! Grow Club costs $6.49 per month and sends you 9 seed pods every month.",
     "Can I try it first?",
     "Yes, new members get a 21-day free trial of Grow Club."),
]

# Openers for the second user turn of generated two-fact conversations.
FOLLOW_UPS = ["", "Thanks. ", "Got it. ", "OK, one more thing. ", "Perfect, thank you. ",
              "Good to know. ", "Thanks! Another question: ", "Cool. "]
# Casual (all lower-case) follow-ups get casual openers.
FOLLOW_UPS_CASUAL = ["", "ok ", "also ", "thx. ", "and "]

N_GENERATED_DIALOGUES = 42


def chat(*turns):
    msgs = [{"role": "system", "content": SYSTEM}]
    for i, text in enumerate(turns):
        msgs.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    return {"messages": msgs}


def check_facts():
    ids = set()
    for f in FACTS:
        assert f["id"] not in ids, f["id"]
        ids.add(f["id"])
        assert len(f["train"]) == 7, f["id"]
        assert len(f["answers"]) == 3, f["id"]
        assert f["answer"].lower() in f["fact"].lower(), f["id"]
        for a in f["answers"]:
            assert f["answer"].lower() in a.lower(), (f["id"], a)
            assert len(a.split()) <= 60, (f["id"], a)
    train_qs = [q for f in FACTS for q in f["train"]]
    valid_qs = [q for f in FACTS for q in f["valid"]]
    assert len(set(train_qs)) == len(train_qs), "duplicate training question"
    assert len(set(valid_qs)) == len(valid_qs), "duplicate held-out question"
    norm = lambda s: " ".join(s.lower().split())
    assert not {norm(q) for q in valid_qs} & {norm(q) for q in train_qs}, "held-out question in train"


def build():
    check_facts()
    rng = random.Random(SEED)

    train = []
    # Single-turn examples: every training phrasing of every fact, with the
    # answer wordings rotated from a seeded starting point.
    for f in FACTS:
        start = rng.randrange(3)
        for i, q in enumerate(f["train"]):
            train.append(chat(q, f["answers"][(start + i) % 3]))

    # Generated two-fact conversations: the second question is a training
    # phrasing of another fact from the same topic, so the follow-up reads
    # like a natural next question.
    by_topic = {}
    for f in FACTS:
        if f["id"] != "bot_name":
            by_topic.setdefault(f["topic"], []).append(f)
    topics = sorted(by_topic)
    for _ in range(N_GENERATED_DIALOGUES):
        topic = rng.choice(topics)
        a, b = rng.sample(by_topic[topic], 2)
        qa, qb = rng.choice(a["train"]), rng.choice(b["train"])
        opener = rng.choice(FOLLOW_UPS_CASUAL if qb[0].islower() else FOLLOW_UPS)
        train.append(chat(qa, rng.choice(a["answers"]),
                          opener + qb, rng.choice(b["answers"])))

    for d in DIALOGUES:
        train.append(chat(*d))
    for q, a in UNKNOWN:
        train.append(chat(q, a))

    rng.shuffle(train)

    valid, evalq = [], []
    for f in FACTS:
        for q in f["valid"]:
            valid.append(chat(q, f["answers"][0]))
            evalq.append({"question": q, "expected": f["answer"], "fact_id": f["id"]})

    facts = [{"id": f["id"], "topic": f["topic"], "fact": f["fact"], "answer": f["answer"]}
             for f in FACTS]
    return facts, train, valid, evalq


def write_jsonl(name, rows):
    with open(os.path.join(HERE, name), "w", encoding="utf-8", newline="\n") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")


def main():
    facts, train, valid, evalq = build()
    write_jsonl("facts.jsonl", facts)
    write_jsonl("train.jsonl", train)
    write_jsonl("valid.jsonl", valid)
    write_jsonl("eval_questions.jsonl", evalq)
    multi = sum(1 for ex in train if len(ex["messages"]) > 3)
    print(f"facts={len(facts)} train={len(train)} (multi-turn={multi}, "
          f"unknown={len(UNKNOWN)}) valid={len(valid)} eval={len(evalq)}")


if __name__ == "__main__":
    main()
